"""An embedded AWS for the demo and the tests: moto in server mode on loopback
with IAM enforcement on, a small IMDSv2 server, and the demo itself.

Not part of what users paste into Func: it needs moto (`pip install ".[demo]"`).

    emulator = AwsEmulator().start()        # users, keys, roles, instances ...
    emulator.enforce()                      # from here on, signatures and policies count
    with emulator.recording() as calls: ... # every request: action, region, key, token
    imds = ImdsServer(credentials).start()  # AWS_EC2_METADATA_SERVICE_ENDPOINT target
"""
import base64
import contextlib
import datetime
import http.server
import json
import os
import re
import shutil
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request

import boto3

READ_POLICY = {
    'Version': '2012-10-17',
    # moto checks CloudWatch calls as monitoring:<Action> (its endpoint's name);
    # AWS as cloudwatch:<Action>, which is what the README's policy grants.
    'Statement': [{'Effect': 'Allow', 'Action': ['ec2:Describe*', 'sts:GetCallerIdentity',
                                                 'cloudwatch:ListMetrics', 'cloudwatch:GetMetricData',
                                                 'monitoring:ListMetrics', 'monitoring:GetMetricData'],
                   'Resource': '*'}],
}
USER_POLICY = {
    'Version': '2012-10-17',
    'Statement': READ_POLICY['Statement'] + [
        {'Effect': 'Allow', 'Action': ['sts:AssumeRole', 'sts:GetSessionToken'], 'Resource': '*'}],
}
ALL_POLICY = {'Version': '2012-10-17',
              'Statement': [{'Effect': 'Allow', 'Action': '*', 'Resource': '*'}]}
PARTITION_REGION = {'aws': 'us-east-1', 'aws-cn': 'cn-northwest-1'}


class AwsEmulator:
    """moto server on 127.0.0.1 with helpers to lay out an estate."""

    def __init__(self):
        # moto's request recorder writes to ./moto_recording unless told otherwise.
        os.environ.setdefault('MOTO_RECORDER_FILEPATH', os.path.join(
            tempfile.gettempdir(), f'moto_recording-{os.getpid()}'))
        from moto.server import ThreadedMotoServer
        self.server = ThreadedMotoServer(ip_address='127.0.0.1', port=0, verbose=False)
        self.url = None
        self._admin = {}

    def start(self):
        import logging
        logging.getLogger('werkzeug').setLevel(logging.ERROR)   # one line per request otherwise
        self.server.start()
        host, port = self.server.get_host_and_port()
        self.url = f'http://{host}:{port}'
        return self

    def stop(self):
        self.server.stop()

    # -- moto's own API ------------------------------------------------------

    def _moto_api(self, path, body=b''):
        req = urllib.request.Request(self.url + path, data=body, method='POST',
                                     headers={'Content-Type': 'text/plain'})
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.read()

    def enforce(self, on=True):
        """IAM enforcement: wrong secrets, tokens and ExternalIds now fail."""
        self._moto_api('/moto-api/reset-auth', b'0' if on else b'1000000000')

    @contextlib.contextmanager
    def recording(self):
        """Yields a list filled, on exit, with every request made meanwhile."""
        calls = []
        self._moto_api('/moto-api/recorder/reset-recording')
        self._moto_api('/moto-api/recorder/start-recording')
        try:
            yield calls
        finally:
            self._moto_api('/moto-api/recorder/stop-recording')
            with urllib.request.urlopen(self.url + '/moto-api/recorder/download-recording',
                                        timeout=30) as resp:
                raw = resp.read().decode()
            calls.extend(parse_request(json.loads(line)) for line in raw.splitlines() if line.strip())

    # -- the estate ------------------------------------------------------------

    def client(self, service, region, creds=None):
        creds = creds or self.admin(partition_of(region))
        return boto3.client(service, endpoint_url=self.url, region_name=region,
                            aws_access_key_id=creds['ak_id'], aws_secret_access_key=creds['ak_secret'],
                            aws_session_token=creds.get('token'))

    def admin(self, partition='aws'):
        """An all-powerful user of `partition`, made while enforcement is off."""
        if partition not in self._admin:
            iam = boto3.client('iam', endpoint_url=self.url, region_name=PARTITION_REGION[partition],
                               aws_access_key_id='AKIAEXAMPLEBOOTSTRAP', aws_secret_access_key='bootstrap')
            iam.create_user(UserName='emulator-admin')
            iam.put_user_policy(UserName='emulator-admin', PolicyName='all',
                                PolicyDocument=json.dumps(ALL_POLICY))
            key = iam.create_access_key(UserName='emulator-admin')['AccessKey']
            self._admin[partition] = {'ak_id': key['AccessKeyId'], 'ak_secret': key['SecretAccessKey']}
        return self._admin[partition]

    def make_user(self, name, partition='aws', policy=READ_POLICY):
        iam = self.client('iam', PARTITION_REGION[partition])
        arn = iam.create_user(UserName=name)['User']['Arn']
        iam.put_user_policy(UserName=name, PolicyName='p', PolicyDocument=json.dumps(policy))
        key = iam.create_access_key(UserName=name)['AccessKey']
        return {'ak_id': key['AccessKeyId'], 'ak_secret': key['SecretAccessKey'], 'arn': arn}

    def make_role(self, name, trusted_arn, partition='aws', external_id=None, policy=READ_POLICY,
                  max_session=3600):
        statement = {'Effect': 'Allow', 'Principal': {'AWS': trusted_arn}, 'Action': 'sts:AssumeRole'}
        if external_id:
            statement['Condition'] = {'StringEquals': {'sts:ExternalId': external_id}}
        iam = self.client('iam', PARTITION_REGION[partition])
        arn = iam.create_role(RoleName=name, MaxSessionDuration=max_session,
                              AssumeRolePolicyDocument=json.dumps(
                                  {'Version': '2012-10-17', 'Statement': [statement]}))['Role']['Arn']
        iam.put_role_policy(RoleName=name, PolicyName='p', PolicyDocument=json.dumps(policy))
        return arn

    def make_mfa_device(self, user, partition='aws'):
        iam = self.client('iam', PARTITION_REGION[partition])
        serial = iam.create_virtual_mfa_device(VirtualMFADeviceName=user)['VirtualMFADevice']['SerialNumber']
        iam.enable_mfa_device(UserName=user, SerialNumber=serial,
                              AuthenticationCode1='123456', AuthenticationCode2='654321')
        return serial

    def run_instances(self, region, count, per_reservation=1, name=None, tags=None,
                      user_data=None, instance_type='t3.micro'):
        """`count` instances in reservations of `per_reservation` (moto pages by
        reservation). Returns their ids."""
        ec2 = self.client('ec2', region)
        image = ec2.describe_images(Owners=['amazon'])['Images'][0]['ImageId']
        ids = []
        while len(ids) < count:
            n = min(per_reservation, count - len(ids))
            tag_list = [{'Key': k, 'Value': v} for k, v in (tags or {}).items()]
            if name is not None:
                tag_list.append({'Key': 'Name', 'Value': name})
            kwargs = {'ImageId': image, 'MinCount': n, 'MaxCount': n, 'InstanceType': instance_type}
            if tag_list:
                kwargs['TagSpecifications'] = [{'ResourceType': 'instance', 'Tags': tag_list}]
            if user_data:
                kwargs['UserData'] = user_data
            ids += [i['InstanceId'] for i in ec2.run_instances(**kwargs)['Instances']]
        return ids

    def assume(self, role_arn, creds, region, external_id=None, duration=3600):
        kwargs = {'ExternalId': external_id} if external_id else {}
        resp = self.client('sts', region, creds).assume_role(
            RoleArn=role_arn, RoleSessionName='instance', DurationSeconds=duration, **kwargs)
        return resp['Credentials']


def partition_of(region):
    return 'aws-cn' if region.startswith('cn-') else 'aws'


_CREDENTIAL_RE = re.compile(r'Credential=([^/]+)/\d+/([^/]+)/([^/]+)/')


def parse_request(raw):
    """A recorded request as what a test asserts on."""
    headers = {k.lower(): v for k, v in raw['headers'].items()}
    body = raw.get('body') or ''
    if raw.get('body_encoded') and body:
        body = base64.b64decode(body).decode('utf-8', 'replace')
    params = dict(urllib.parse.parse_qsl(body)) if body else {}
    query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(raw['url']).query))
    params.update(query)
    match = _CREDENTIAL_RE.search(headers.get('authorization', ''))
    return {
        # Query protocol: Action=...; JSON protocol: X-Amz-Target: <prefix>.<Action>.
        'action': params.get('Action') or headers.get('x-amz-target', '').rpartition('.')[2] or None,
        'service': match.group(3) if match else None,
        'region': match.group(2) if match else None,
        'access_key': match.group(1) if match else None,
        'token': headers.get('x-amz-security-token'),
        'params': params,
        'url': raw['url'],
    }


class ImdsServer:
    """IMDSv2 as an EC2 instance serves it: a token from PUT, then the role's
    credentials. `hang_token=True` behaves like a container behind a hop
    limit of 1: the token request never answers."""

    def __init__(self, credentials=None, role='collector-role', hang_token=False):
        self.credentials = credentials
        self.role = role
        self.hang_token = hang_token
        self.requests = []
        self.release = threading.Event()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_PUT(self):
                outer.requests.append(('PUT', self.path))
                if outer.hang_token:
                    outer.release.wait(10)
                    return
                self._send(200, 'imds-test-token')

            def do_GET(self):
                outer.requests.append(('GET', self.path))
                if self.headers.get('X-aws-ec2-metadata-token') != 'imds-test-token':
                    return self._send(401, '')
                base = '/latest/meta-data/iam/security-credentials/'
                if self.path == base:
                    return self._send(200, outer.role if outer.credentials else '')
                if self.path == base + outer.role and outer.credentials:
                    c = outer.credentials
                    expiry = c['Expiration']
                    if isinstance(expiry, datetime.datetime):
                        expiry = expiry.astimezone(datetime.timezone.utc).strftime('%Y-%m-%dT%H:%M:%SZ')
                    return self._send(200, json.dumps({
                        'Code': 'Success', 'Type': 'AWS-HMAC', 'AccessKeyId': c['AccessKeyId'],
                        'SecretAccessKey': c['SecretAccessKey'], 'Token': c['SessionToken'],
                        'Expiration': expiry, 'LastUpdated': expiry}))
                self._send(404, '')

            def _send(self, status, text):
                body = text.encode()
                self.send_response(status)
                self.send_header('Content-Length', str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f'http://127.0.0.1:{self.httpd.server_address[1]}'

    def start(self):
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def stop(self):
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


# --------------------------------------------------------------------------
# The demo: the four startup scripts of scripts/ against the emulator
# --------------------------------------------------------------------------

DEMO_REGIONS = {'cn-northwest-1': 3, 'cn-north-1': 2}
SCRIPTS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'scripts')
SCRIPTS = [
    ('1. IAM user keys', '1_iam_user.py'),
    ('2. IAM user assumes a role (STS)', '2_assume_role.py'),
    ('3. MFA + role', '3_mfa.py'),
    ('4. EC2 instance role', '4_instance_role.py'),
    ('5. EC2 and its CloudWatch metrics', '5_ec2_with_metrics.py'),
]


def build_demo_estate(emulator):
    """Users, a role with an ExternalId, an MFA device and instances in two
    China regions (the seed page's own region), then enforcement on."""
    admin = emulator.admin('aws-cn')
    for region, count in DEMO_REGIONS.items():
        ids = emulator.run_instances(region, count, name=f'web-{region}', tags={'env': 'demo'})
        put_demo_metrics(emulator, region, ids)
    user = emulator.make_user('collector', 'aws-cn', policy=USER_POLICY)
    role = emulator.make_role('ec2-reader', user['arn'], 'aws-cn', external_id='demo-external-id')
    serial = emulator.make_mfa_device('collector', 'aws-cn')
    instance_role = emulator.make_role('instance-role', user['arn'], 'aws-cn')
    emulator.enforce()
    instance_creds = emulator.assume(instance_role, user, 'cn-northwest-1')
    return {
        '<AWS AK ID>': user['ak_id'], '<AWS AK SECRET>': user['ak_secret'],
        '<AWS ASSUME ROLE ARN>': role, '<AWS EXTERNAL ID>': 'demo-external-id',
        '<AWS ROLE SESSION NAME>': 'Integration', '<MFA DEVICE NUMBER>': serial,
        '<MFA TOTP>': '123456', 'admin': admin, 'instance_creds': instance_creds,
    }


def put_demo_metrics(emulator, region, instance_ids, now=None):
    """moto makes no EC2 metrics: an hour of CPUUtilization and NetworkIn,
    one datapoint a minute, for each instance."""
    import datetime
    from botocore.config import Config
    creds = emulator.admin(partition_of(region))
    # botocore gzips large PutMetricData bodies; moto then fails their signature.
    cloudwatch = boto3.client('cloudwatch', endpoint_url=emulator.url, region_name=region,
                              aws_access_key_id=creds['ak_id'], aws_secret_access_key=creds['ak_secret'],
                              config=Config(disable_request_compression=True))
    now = int(now or time.time()) // 60 * 60
    for number, instance_id in enumerate(instance_ids):
        dimensions = [{'Name': 'InstanceId', 'Value': instance_id}]
        data = []
        for minute in range(60):
            stamp = datetime.datetime.fromtimestamp(now - 60 * (minute + 1), datetime.timezone.utc)
            data.append({'MetricName': 'CPUUtilization', 'Dimensions': dimensions, 'Timestamp': stamp,
                         'Value': 5.0 + number + (minute % 7)})
            data.append({'MetricName': 'NetworkIn', 'Dimensions': dimensions, 'Timestamp': stamp,
                         'Value': 1000.0 * (number + 1) + minute})
        for start in range(0, len(data), 500):
            cloudwatch.put_metric_data(Namespace='AWS/EC2', MetricData=data[start:start + 500])


def fill_placeholders(text, values):
    for placeholder, value in values.items():
        if placeholder.startswith('<'):
            text = text.replace(placeholder, value)
    return text


def run_demo(verbose=0):
    from integration_local import cli as local_cli
    print('Starting the embedded AWS emulator (moto, IAM enforcement on) ...')
    emulator = AwsEmulator().start()
    work = tempfile.mkdtemp(prefix='integration-demo-')
    saved = dict(os.environ)
    try:
        values = build_demo_estate(emulator)
        imds = ImdsServer(values['instance_creds']).start()
        receiver = DemoReceiver().start()
        os.environ.update({
            'AWS_ENDPOINT_URL': emulator.url, 'AWS_EC2_METADATA_SERVICE_ENDPOINT': imds.url,
            'AWS_SHARED_CREDENTIALS_FILE': os.devnull, 'AWS_CONFIG_FILE': os.devnull,
            'INTEGRATION_STATE_DIR': os.path.join(work, 'state'), 'INTEGRATION_FORCE': '1'})
        for name in ('AWS_ACCESS_KEY_ID', 'AWS_SECRET_ACCESS_KEY', 'AWS_SESSION_TOKEN', 'AWS_PROFILE'):
            os.environ.pop(name, None)
        print(f'  emulator {emulator.url}, IMDS {imds.url}, DataKit stand-in {receiver.url}')
        print(f'  estate: {sum(DEMO_REGIONS.values())} instances in {", ".join(DEMO_REGIONS)}; '
              "the seed's scripts collect cn-northwest-1\n")
        results = []
        for title, filename in SCRIPTS:
            with open(os.path.join(SCRIPTS_DIR, filename), encoding='utf-8') as f:
                text = fill_placeholders(f.read(), values)
            path = os.path.join(work, filename)
            with open(path, 'w', encoding='utf-8') as f:
                f.write(text)
            print(f'=== {title}: scripts/{filename}')
            before = receiver.count
            status = local_cli.main(['run', path, '--datakit', receiver.url] + ['-v'] * verbose)
            results.append((title, status, receiver.count - before))
            print()
        print('=== Summary')
        for title, status, points in results:
            print(f'  {title:<36} {"OK" if status == 0 else "FAILED (exit %d)" % status:<10} '
                  f'{points} point(s) delivered')
        print(f'\nDataKit stand-in received {receiver.count} point(s); sample line:')
        print('  ' + (receiver.lines[0][:200] + ' ...' if receiver.lines else '(none)'))
        return 0 if all(status == 0 for _, status, _ in results) else 1
    finally:
        os.environ.clear()
        os.environ.update(saved)
        emulator.stop()
        shutil.rmtree(work, ignore_errors=True)


class DemoReceiver:
    """A DataKit stand-in that accepts line protocol and counts it."""

    def __init__(self):
        self.lines = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get('Content-Length', 0)))
                if self.headers.get('Content-Encoding') == 'gzip':
                    import gzip
                    body = gzip.decompress(body)
                outer.lines.extend(body.decode().splitlines())
                self.send_response(200)
                self.send_header('Content-Length', '0')
                self.end_headers()

        self.httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
        self.url = f'http://127.0.0.1:{self.httpd.server_address[1]}'

    @property
    def count(self):
        return len(self.lines)

    def start(self):
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self


if __name__ == '__main__':
    sys.exit(run_demo())
