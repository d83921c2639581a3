"""integration_aws_auth against a real moto server with IAM enforcement on."""
import base64
import datetime
import hashlib
import hmac
import json
import logging
import os
import socketserver
import stat
import threading

import urllib.parse

import pytest
from botocore.exceptions import ClientError

import integration_aws_auth as auth
import integration_aws_ec2__main as ec2
import integration_core__runner as core
from integration_local.runtime import FileCache
from conftest import account_of, sts_calls, unique
from integration_local.emulator import ImdsServer, USER_POLICY
from servers import FaultProxy, ec2_error

UTC = datetime.timezone.utc


class Clock:
    """An injectable clock that starts at the real now and moves on command."""

    def __init__(self):
        self.now = datetime.datetime.now(UTC)

    def __call__(self):
        return self.now

    def advance(self, seconds):
        self.now += datetime.timedelta(seconds=seconds)


def identity(account, region='us-east-1', **kwargs):
    session = auth.get_session(account, region=region, **kwargs)
    return session, auth.describe_identity(session, account, cache=kwargs.get('cache'))


def ec2_call(session, region='us-east-1'):
    return session.client('ec2', region_name=region).describe_instances(MaxResults=5)


def sts_error(code, message, status=400):
    return ('status', status, '<ErrorResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">'
            f'<Error><Type>Sender</Type><Code>{code}</Code><Message>{message}</Message></Error>'
            '<RequestId>test</RequestId></ErrorResponse>')


MAX_SESSION_TEXT = 'The requested DurationSeconds exceeds the MaxSessionDuration set for this role.'
CHAINING_TEXT = ('The requested DurationSeconds exceeds the 1 hour session limit for roles '
                 'assumed by role chaining.')
CODE_REFUSED_TEXT = 'MultiFactorAuthentication failed with invalid MFA one time pass code.'


class StsRules:
    """What moto leaves out of STS, done as AWS does it, by a proxy in front of
    moto: AssumeRole's DurationSeconds against the role's MaxSessionDuration
    (moto's own record of the role) and against the 1 h cap of role chaining
    (for the roles in `chained`), and each MFA code accepted once. With
    `spend_refused_codes`, a code is spent even by a request AWS refused for its
    duration: the pessimistic reading of AWS, for the worst case."""

    def __init__(self, emulator, spend_refused_codes=False):
        self.emulator = emulator
        self.chained = set()
        self.spend_refused_codes = spend_refused_codes
        self.spent = set()
        self.limits = {}
        self.proxy = FaultProxy(emulator.url, self.rule)
        self.url = self.proxy.url

    def rule(self, request):
        if request['service'] != 'sts' or request['action'] not in ('AssumeRole', 'GetSessionToken'):
            return None
        params = dict(urllib.parse.parse_qsl(request['body'].decode()))
        code = params.get('TokenCode')
        if code and code in self.spent:
            return sts_error('AccessDenied', CODE_REFUSED_TEXT, 403)
        fault = None
        if request['action'] == 'AssumeRole':
            duration = int(params.get('DurationSeconds', 3600))
            if params['RoleArn'] in self.chained and duration > 3600:
                fault = sts_error('ValidationError', CHAINING_TEXT)
            elif duration > self.max_session(params['RoleArn']):
                fault = sts_error('ValidationError', MAX_SESSION_TEXT)
        if code and (fault is None or self.spend_refused_codes):
            self.spent.add(code)
        return fault

    def max_session(self, role):
        if role not in self.limits:
            iam = self.emulator.client('iam', 'us-east-1')
            self.limits[role] = iam.get_role(RoleName=role.split('/')[-1])['Role']['MaxSessionDuration']
        return self.limits[role]

    def assume_durations(self):
        return [int(dict(urllib.parse.parse_qsl(r['body'].decode())).get('DurationSeconds', 0))
                for r in self.proxy.seen if r['action'] == 'AssumeRole']


@pytest.fixture
def sts(aws, emulator, monkeypatch):
    """moto behind StsRules: AWS's session length limits and once-only MFA codes."""
    rules = StsRules(emulator)
    monkeypatch.setenv('AWS_ENDPOINT_URL', rules.url)
    yield rules
    rules.proxy.stop()


# -- each method end to end ----------------------------------------------------

def test_access_keys_identity_and_sts_region(aws, user):
    with aws.recording() as calls:
        session, ident = identity(account_of(user), region='eu-west-1')
        ec2_call(session, 'eu-west-1')
    assert ident['arn'] == user['arn']
    assert ident['method'] == 'access_key'
    assert ident['account_id'] == '123456789012'
    assert ident['partition'] == 'aws'
    (call,) = sts_calls(calls)
    assert call['action'] == 'GetCallerIdentity'
    assert call['region'] == 'eu-west-1' and call['access_key'] == user['ak_id'] and call['token'] is None
    ec2 = [c for c in calls if c['service'] == 'ec2']
    assert ec2 and all(c['access_key'] == user['ak_id'] for c in ec2)


def test_wrong_secret_is_refused_without_echoing_it(aws, user):
    bad = 'Wrong' + user['ak_secret'][5:]
    with pytest.raises(auth.AuthError) as info:
        identity(account_of(user, ak_secret=bad))
    assert 'SignatureDoesNotMatch' in str(info.value)
    assert bad not in str(info.value) and user['ak_secret'] not in str(info.value)


def make_role(aws, user, external_id=None, max_session=3600, partition='aws'):
    return aws.make_role(unique('role'), user['arn'], partition, external_id=external_id,
                         max_session=max_session)


def test_assume_role_with_external_id(aws, user):
    role = make_role(aws, user, external_id='ext-12345')
    account = account_of(user, assume_role_arn=role, external_id='ext-12345')
    with aws.recording() as calls:
        session, ident = identity(account)
        ec2_call(session)
    role_name = role.split('/')[-1]
    assert ident['arn'] == f'arn:aws:sts::123456789012:assumed-role/{role_name}/Integration'
    assert ident['method'] == 'assume_role'
    (assume,) = sts_calls(calls, 'AssumeRole')
    assert assume['access_key'] == user['ak_id']
    assert assume['params']['ExternalId'] == 'ext-12345'
    assert assume['params']['RoleSessionName'] == 'Integration'
    ec2 = [c for c in calls if c['service'] == 'ec2']
    assert ec2 and all(c['access_key'] != user['ak_id'] and c['token'] for c in ec2)


def test_role_session_name_is_used(aws, user):
    role = make_role(aws, user)
    _, ident = identity(account_of(user, assume_role_arn=role, role_session_name='alice@ops'))
    assert ident['arn'].endswith('/alice@ops')


def test_wrong_external_id_fails_with_a_hint(aws, user):
    role = make_role(aws, user, external_id='right-one')
    with pytest.raises(auth.AuthError) as info:
        identity(account_of(user, assume_role_arn=role, external_id='wrong-one'))
    assert 'AccessDenied' in str(info.value) and "account['external_id']" in str(info.value)


def test_role_credentials_are_reused_across_runs(aws, user, monkeypatch):
    dff = FuncDFF()
    monkeypatch.setattr(auth, 'DFF', dff, raising=False)
    role = make_role(aws, user)
    account = account_of(user, assume_role_arn=role)
    with aws.recording() as first:
        session = auth.get_session(account, region='us-east-1')
    # A session just issued is marked verified at once: not shown to AWS again.
    assert [c['action'] for c in sts_calls(first)] == ['AssumeRole']
    flag = session_key(dff) + auth.VERIFIED_SUFFIX
    assert dff.CACHE.data[flag] and dff.CACHE.ttl[flag] == auth.VERIFY_INTERVAL
    first_key = session.get_credentials().get_frozen_credentials().access_key
    auth.describe_identity(session, account)      # the first run's banner
    with aws.recording() as calls:   # the next */15 run: a new session, same cache
        session, ident = identity(account)
        ec2_call(session)
    # Steady state: the cached session is neither renewed nor shown to AWS.
    assert sts_calls(calls) == [], 'the second run must reuse the cached role session without STS'
    ec2 = [c for c in calls if c['service'] == 'ec2']
    assert ec2 and all(c['access_key'] == first_key and c['token'] for c in ec2)
    assert first_key != user['ak_id'] and 'assumed-role' in ident['arn']


def test_role_session_is_shown_to_aws_again_once_its_check_is_an_hour_old(aws, user, tmp_path):
    """The verified flag lives VERIFY_INTERVAL in the cache (the local
    runtime's FileCache, its clock moved on): until then runs make no STS
    call, then one GetCallerIdentity with the cached session, no AssumeRole."""
    assert auth.VERIFY_INTERVAL == 3600, 'the README promises at most one check an hour'
    now = [1_700_000_000.0]
    cache = FileCache(root=str(tmp_path / 'moved'), clock=lambda: now[0])
    role = make_role(aws, user, max_session=43200)        # a 12 h session outlives the hour
    account = account_of(user, assume_role_arn=role)
    session, ident = identity(account, cache=cache)
    first_key = session.get_credentials().get_frozen_credentials().access_key
    now[0] += auth.VERIFY_INTERVAL - 1
    with aws.recording() as calls:
        identity(account, cache=cache)
    assert sts_calls(calls) == [], 'checked less than VERIFY_INTERVAL ago: no STS call'
    now[0] += 1                                           # the flag has expired
    with aws.recording() as calls:
        session, again = identity(account, cache=cache)
        ec2_call(session)
    (check,) = sts_calls(calls)
    assert check['action'] == 'GetCallerIdentity'
    assert check['access_key'] == first_key and check['token'], 'the cached session is what is shown'
    assert session.get_credentials().get_frozen_credentials().access_key == first_key
    assert again == ident
    now[0] += auth.VERIFY_INTERVAL - 1                    # checked again: quiet for another hour
    with aws.recording() as calls:
        identity(account, cache=cache)
    assert sts_calls(calls) == []


def test_short_role_session_refreshes_during_a_long_run(aws, user):
    role = make_role(aws, user)
    clock = Clock()
    account = account_of(user, assume_role_arn=role, duration_seconds=900)
    with aws.recording() as calls:
        session = auth.get_session(account, region='us-east-1', clock=clock)
        ec2_call(session)
        clock.advance(500)          # 400 s left: still fresh
        ec2_call(session)
        clock.advance(200)          # 200 s left: inside the refresh window
        ec2_call(session)
    # (moto dates its sessions by the real clock, so the fake one cannot go
    # past the second session's end without making it look expired too.)
    assumes = sts_calls(calls, 'AssumeRole')
    assert len(assumes) == 2, [c['action'] for c in calls]
    assert all(c['params']['DurationSeconds'] == '900' for c in assumes)
    ec2 = [c for c in calls if c['service'] == 'ec2']
    assert len(ec2) == 3
    assert ec2[0]['access_key'] == ec2[1]['access_key'] != ec2[2]['access_key']


# -- MFA ---------------------------------------------------------------------------

def mfa_account(aws, user, role=None, code='918273', **extra):
    serial = aws.make_mfa_device(user['arn'].split('/')[-1])
    account = account_of(user, serial_number=serial, token_code=code, **extra)
    if role:
        account['assume_role_arn'] = role
    return account


def test_mfa_with_role_sends_the_code_once_across_runs(aws, user):
    role = make_role(aws, user)
    account = mfa_account(aws, user, role)
    with aws.recording() as first:
        session, ident = identity(account)
        ec2_call(session)
    with aws.recording() as second:
        session, ident2 = identity(account)
        ec2_call(session)
    (assume,) = sts_calls(first, 'AssumeRole')
    assert assume['params']['TokenCode'] == '918273'
    assert assume['params']['SerialNumber'] == account['serial_number']
    assert sts_calls(second) == [], 'the cached MFA session is reused without any STS call'
    assert ident2 == ident and ident['method'] == 'mfa_assume_role'


def test_mfa_without_role_uses_get_session_token_once(aws, user):
    account = mfa_account(aws, user, duration_seconds=7200)
    with aws.recording() as first:
        session = auth.get_session(account, region='us-east-1')
        session.client('ec2', region_name='us-east-1').meta.events  # no call yet
        frozen = session.get_credentials().get_frozen_credentials()
    # moto's GetSessionToken returns fixed credentials that its own IAM
    # enforcement refuses; AWS's work. So the second run is made with
    # enforcement off: were the cached session shown to AWS (GetCallerIdentity),
    # the list of calls below, not moto, would say so.
    aws.enforce(False)
    try:
        with aws.recording() as second:
            again = auth.get_session(account, region='us-east-1').get_credentials().get_frozen_credentials()
    finally:
        aws.enforce(True)
    (gst,) = sts_calls(first)
    assert gst['action'] == 'GetSessionToken' and gst['access_key'] == user['ak_id']
    assert gst['params']['TokenCode'] == '918273'
    assert gst['params']['DurationSeconds'] == '7200'
    assert sts_calls(second) == [], 'the cached session is reused without any STS call'
    # What matters is that the session uses them (with their token), and the
    # second run reuses them.
    assert frozen.token and again.access_key == frozen.access_key


def test_expired_mfa_session_with_the_used_code_fails_clearly(aws, sts, user, caplog):
    role = make_role(aws, user)
    account = mfa_account(aws, user, role)
    clock = Clock()
    identity(account, clock=clock)
    clock.advance(4000)              # the 1-hour session is over
    with aws.recording() as calls:
        with pytest.raises(auth.AuthError) as info:
            auth.get_session(account, region='us-east-1', clock=clock)
    message = str(info.value)
    assert account['serial_number'] in message
    assert 'expired at' in message and "account['token_code']" in message and 'fresh code' in message
    assert '918273' not in message
    assert sts_calls(calls) == [], 'a used code must never be sent again'


def test_mfa_session_short_of_an_hour_warns(aws, user, caplog):
    account = mfa_account(aws, user, duration_seconds=3000)
    with caplog.at_level(logging.WARNING, logger='integration'):
        auth.get_session(account, region='us-east-1')
    assert any('expires at' in r.getMessage() and 'fresh code' in r.getMessage() for r in caplog.records)


def test_fresh_code_after_expiry_starts_a_new_session(aws, sts, user):
    role = make_role(aws, user)
    account = mfa_account(aws, user, role)
    clock = Clock()
    identity(account, clock=clock)
    clock.advance(4000)
    account['token_code'] = '654321'
    with aws.recording() as calls:
        auth.get_session(account, region='us-east-1', clock=clock)
    (assume,) = sts_calls(calls, 'AssumeRole')
    assert assume['params']['TokenCode'] == '654321'


# -- the instance role (default chain) -------------------------------------------

@pytest.fixture
def imds(aws, user, monkeypatch):
    role = make_role(aws, user)
    creds = aws.assume(role, user, 'us-east-1')
    server = ImdsServer(creds).start()
    monkeypatch.setenv('AWS_EC2_METADATA_SERVICE_ENDPOINT', server.url)
    yield server, role
    server.stop()


def test_instance_role_through_imdsv2(aws, imds):
    server, role = imds
    account = {'extra_tags': {'account_name': 'role for ec2'}}
    session, ident = identity(account)
    ec2_call(session)
    assert ident['arn'].startswith(f"arn:aws:sts::123456789012:assumed-role/{role.split('/')[-1]}/")
    assert ident['method'] == 'default_chain (iam-role)'
    assert ('PUT', '/latest/api/token') in server.requests


def test_imds_token_timeout_points_at_the_hop_limit(monkeypatch):
    server = ImdsServer(None, hang_token=True).start()
    monkeypatch.setenv('AWS_EC2_METADATA_SERVICE_ENDPOINT', server.url)
    monkeypatch.setenv('AWS_EC2_METADATA_V1_DISABLED', 'true')
    try:
        with pytest.raises(auth.AuthError) as info:
            auth.get_session({}, region='us-east-1')
    finally:
        server.stop()
    assert 'hop limit to 2' in str(info.value) and 'timed out' in str(info.value)


def test_no_imds_says_this_is_not_ec2():
    with pytest.raises(auth.AuthError) as info:
        auth.get_session({}, region='us-east-1')
    assert 'not reachable' in str(info.value) and 'ak_id' in str(info.value)


def test_role_assumed_from_the_instance_role(aws, imds, user):
    _, base_role = imds
    base_session = f"arn:aws:sts::123456789012:assumed-role/{base_role.split('/')[-1]}/instance"
    target = aws.make_role(unique('target'), base_session, 'aws')
    # The base role's sessions may assume the target role.
    iam = aws.client('iam', 'us-east-1')
    iam.put_role_policy(RoleName=base_role.split('/')[-1], PolicyName='assume',
                        PolicyDocument=json.dumps(USER_POLICY))
    _, ident = identity({'assume_role_arn': target})
    assert ident['method'] == 'default_chain_assume_role'
    assert f"assumed-role/{target.split('/')[-1]}/Integration" in ident['arn']


# -- partitions and endpoints --------------------------------------------------

def test_china_keys_work_in_cn_northwest_1(aws, cn_user):
    with aws.recording() as calls:
        session, ident = identity(account_of(cn_user), region='cn-northwest-1')
    assert ident['partition'] == 'aws-cn' and ident['arn'].startswith('arn:aws-cn:iam::')
    assert sts_calls(calls)[0]['region'] == 'cn-northwest-1'


class RecordingProxy(socketserver.ThreadingTCPServer):
    """An HTTPS proxy that records each CONNECT target and refuses it, so the
    host botocore would reach is seen without reaching the internet."""
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self):
        self.targets = []
        outer = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self):
                line = self.rfile.readline().decode()
                outer.targets.append(line.split()[1] if len(line.split()) > 1 else line)
                self.wfile.write(b'HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n')
        super().__init__(('127.0.0.1', 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()


@pytest.mark.parametrize('region,host', [
    ('cn-northwest-1', 'sts.cn-northwest-1.amazonaws.com.cn:443'),
    ('cn-north-1', 'sts.cn-north-1.amazonaws.com.cn:443'),
    ('us-gov-west-1', 'sts.us-gov-west-1.amazonaws.com:443'),
])
def test_sts_host_of_the_partition_without_endpoint_override(monkeypatch, region, host):
    proxy = RecordingProxy()
    monkeypatch.setenv('HTTPS_PROXY', f'http://127.0.0.1:{proxy.server_address[1]}')
    monkeypatch.setenv('AWS_MAX_ATTEMPTS', '1')
    partition = 'aws-cn' if region.startswith('cn') else 'aws-us-gov'
    account = {'ak_id': 'AKIAEXAMPLE000000001', 'ak_secret': 'fake-secret-value-0000',
               'assume_role_arn': f'arn:{partition}:iam::123456789012:role/reader'}
    try:
        with pytest.raises(auth.AuthError) as info:
            auth.get_session(account, region=region)
    finally:
        proxy.shutdown()
        proxy.server_close()
    assert proxy.targets == [host]
    assert 'fake-secret-value' not in str(info.value)


def test_sts_endpoint_variable_is_honoured(emulator, user, monkeypatch):
    monkeypatch.setenv('AWS_ENDPOINT_URL', 'http://127.0.0.1:9')     # nothing listens
    monkeypatch.setenv('AWS_ENDPOINT_URL_STS', emulator.url)
    session = auth.get_session(account_of(user), region='us-east-1')
    assert auth.describe_identity(session, account_of(user))['arn'] == user['arn']


def test_the_region_tables_of_the_version_before_are_made_again_without_its_session():
    """A Func worker keeps the region tables for its life; the version before
    kept the whole botocore session that made them, with what it read of the
    credentials file. The new version makes them again and drops that session,
    and a region the tables do not list still gets its partition."""
    import botocore.session
    data = auth.process_shared().data
    saved = {key: data.pop(key) for key in ('regions', 'endpoint_resolver', 'endpoint_session')
             if key in data}
    try:
        data['regions'] = {'us-east-1': 'aws'}
        data['endpoint_session'] = botocore.session.Session()
        assert auth.partition_of('ap-east-9') == 'aws'
        assert auth.partition_of('cn-north-9') == 'aws-cn'
        assert 'endpoint_session' not in data and data['regions']['eu-west-1'] == 'aws'
    finally:
        for key in ('regions', 'endpoint_resolver', 'endpoint_session'):
            data.pop(key, None)
        data.update(saved)


def test_regions_of_two_partitions_are_a_config_error():
    account = {'ak_id': 'AKIAEXAMPLE000000001', 'ak_secret': 'fake-secret-value-0000'}
    with pytest.raises(auth.AccountConfigError) as info:
        auth.get_session(account, regions=['us-east-1', 'cn-northwest-1'])
    assert 'partitions' in str(info.value) and 'cn-northwest-1 (aws-cn)' in str(info.value)


def test_role_of_another_partition_is_a_config_error():
    account = {'ak_id': 'AKIAEXAMPLE000000001', 'ak_secret': 'fake-secret-value-0000',
               'assume_role_arn': 'arn:aws:iam::123456789012:role/reader'}
    with pytest.raises(auth.AccountConfigError, match="'aws-cn'"):
        auth.get_session(account, region='cn-northwest-1')


# -- caching and secrets -----------------------------------------------------------

def test_cache_files_hold_no_long_term_secret(aws, user, tmp_path):
    role = make_role(aws, user)
    account = mfa_account(aws, user, role, code='246810')
    identity(account)
    cache_dir = tmp_path / 'state' / 'cache'
    files = list(cache_dir.iterdir())
    assert files
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        text = path.read_text()
        assert user['ak_secret'] not in text and '246810' not in text
        assert user['ak_id'] not in path.name and len(path.stem) == 64
    assert stat.S_IMODE(cache_dir.stat().st_mode) == 0o700


class FuncCache:
    """DFF.CACHE as Func has it: Redis-like, values come back as strings."""

    def __init__(self):
        self.data = {}
        self.ttl = {}       # the expiry asked for, per key (Redis would drop the key then)

    def get(self, key, scope=None):
        return self.data.get(key)

    def set(self, key, value, scope=None, expire=None):
        assert isinstance(value, str), 'DFF.CACHE takes strings'
        self.data[key] = value
        self.ttl[key] = expire

    def delete(self, key, scope=None):
        self.data.pop(key, None)
        self.ttl.pop(key, None)


class FuncDFF:
    def __init__(self):
        self.CACHE = FuncCache()


def test_inside_func_dff_cache_is_used(aws, user, monkeypatch, tmp_path):
    dff = FuncDFF()
    monkeypatch.setattr(core, 'DFF', dff, raising=False)
    role = make_role(aws, user)
    identity(account_of(user, assume_role_arn=role))
    assert dff.CACHE.data, 'the role session must be kept in DFF.CACHE'
    for key, value in dff.CACHE.data.items():
        if key.startswith(auth.SESSION_KEY_PREFIX) and key.endswith(auth.VERIFIED_SUFFIX):
            assert set(json.loads(value)) == {'checked'} and dff.CACHE.ttl[key] == auth.VERIFY_INTERVAL
        elif key.startswith(auth.SESSION_KEY_PREFIX):
            assert value.startswith('v1:')
        else:
            json.loads(value)
        assert user['ak_secret'] not in value
    assert not (tmp_path / 'state' / 'cache').exists()


def test_dff_injected_into_the_auth_script_is_used(aws, user, monkeypatch):
    dff = FuncDFF()
    monkeypatch.setattr(auth, 'DFF', dff, raising=False)
    identity(account_of(user, assume_role_arn=make_role(aws, user)))
    assert any(key.startswith('integration_aws_auth:') for key in dff.CACHE.data)


def session_entries(dff):
    """The session records (not their verified flags, key + VERIFIED_SUFFIX)."""
    return [key for key in dff.CACHE.data
            if key.startswith(auth.SESSION_KEY_PREFIX) and not key.endswith(auth.VERIFIED_SUFFIX)]


def session_key(dff):
    (key,) = session_entries(dff)
    return key


def dff_texts(dff):
    """Every key and value of a FuncCache, as someone reading Func's Redis sees them."""
    return [(f'DFF.CACHE {key}', f'{key} {value}') for key, value in dff.CACHE.data.items()]


def file_texts(tmp_path):
    """Every cache file of the local runtime, name and content."""
    return [(f'file {p.name}', p.name + ' ' + p.read_text()) for p in (tmp_path / 'state' / 'cache').iterdir()]


def cache_leaks(texts, *secrets):
    assert all(len(s) >= 16 for s in secrets), 'a secret too short to look for'
    return [f'{where}: {secret[:4]}...' for where, text in texts for secret in secrets if secret in text]


SEALED_METHODS = ['assume_role', 'mfa_assume_role', 'mfa_session', 'default_chain_assume_role']


@pytest.mark.parametrize('store', ['DFF.CACHE', 'files'])
@pytest.mark.parametrize('method', SEALED_METHODS)
def test_cache_holds_no_temporary_credentials(aws, user, request, monkeypatch, tmp_path, method, store):
    """DFF.CACHE is Func's shared Redis (every script reads every scope, and a
    failed task replays its SET commands on the worker's stdout): a cached
    session is sealed, and still reused by the next run."""
    dff = FuncDFF()
    if store == 'DFF.CACHE':
        monkeypatch.setattr(auth, 'DFF', dff, raising=False)
    base = []
    if method == 'default_chain_assume_role':
        server, base_role = request.getfixturevalue('imds')
        account = {'assume_role_arn': chained_target(aws, base_role)}
        base = [server.credentials['SecretAccessKey'], server.credentials['SessionToken']]
    elif method == 'mfa_session':
        account = mfa_account(aws, user)
    elif method == 'mfa_assume_role':
        account = mfa_account(aws, user, make_role(aws, user))
    else:
        account = account_of(user, assume_role_arn=make_role(aws, user))
    assert auth.auth_method(account) == method
    first = auth.get_session(account, region='us-east-1').get_credentials().get_frozen_credentials()
    # moto's GetSessionToken credentials fail its own IAM enforcement (see
    # test_mfa_without_role_uses_get_session_token_once); the recorder still
    # sees a GetCallerIdentity that should not be made.
    aws.enforce(method != 'mfa_session')
    try:
        with aws.recording() as calls:
            again = auth.get_session(account, region='us-east-1').get_credentials().get_frozen_credentials()
    finally:
        aws.enforce(True)
    assert sts_calls(calls) == [], 'the sealed session is reused, without any STS call'
    assert again.access_key == first.access_key and first.token
    texts = dff_texts(dff) if store == 'DFF.CACHE' else file_texts(tmp_path)
    assert len(texts) >= 2, texts
    leaks = cache_leaks(texts, first.access_key, first.secret_key, first.token, user['ak_secret'], *base)
    assert not leaks, 'secrets readable in the cache:\n' + '\n'.join(leaks)


def test_sealed_record_is_the_documented_format():
    """'v1:' + base64(nonce || ciphertext || tag), with keys derived from the
    base secret and an HMAC-SHA256 counter-mode keystream, as the README says:
    checked here by an independent implementation."""
    secret = 'wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY'
    text = json.dumps({'secret_key': 'x' * 700, 'token': 'y' * 600})
    sealed = auth._seal(auth._seal_keys(secret), text)
    assert sealed.startswith('v1:') and 'x' * 8 not in sealed
    blob = base64.b64decode(sealed[3:])
    assert len(blob) == 16 + len(text) + 16
    nonce, body, tag = blob[:16], blob[16:-16], blob[-16:]
    enc_key = hmac.new(secret.encode(), b'integration_aws_auth cache encryption v1', hashlib.sha256).digest()
    mac_key = hmac.new(secret.encode(), b'integration_aws_auth cache mac v1', hashlib.sha256).digest()
    assert tag == hmac.new(mac_key, b'\x01' + nonce + body, hashlib.sha256).digest()[:16]
    stream = b''.join(hmac.new(enc_key, nonce + i.to_bytes(8, 'big'), hashlib.sha256).digest()
                      for i in range(len(body) // 32 + 1))
    assert bytes(a ^ b for a, b in zip(body, stream)).decode() == text
    assert auth._unseal(auth._seal_keys(secret), sealed) == text
    assert auth._seal(auth._seal_keys(secret), text) != sealed, 'a fresh nonce each time'
    assert auth._unseal(auth._seal_keys(secret[:-1] + 'X'), sealed) is None


def flip(sealed, index):
    blob = bytearray(base64.b64decode(sealed[3:]))
    blob[index] ^= 0x01
    return 'v1:' + base64.b64encode(bytes(blob)).decode()


BAD_SEALS = {
    'altered ciphertext': lambda value, reseal: flip(value, 40),
    'altered tag': lambda value, reseal: flip(value, -1),
    'altered nonce': lambda value, reseal: flip(value, 0),
    'cut short': lambda value, reseal: value[:30],
    'not base64': lambda value, reseal: 'v1:' + value[3:40] + '*' + value[41:],
    'sealed with another secret': lambda value, reseal: reseal('AnotherSecretOf40CharactersXXXXXXXXXXXXX'),
}


@pytest.mark.parametrize('case', list(BAD_SEALS), ids=list(BAD_SEALS))
def test_session_entry_that_does_not_open_counts_as_absent(aws, user, monkeypatch, caplog, case):
    dff = FuncDFF()
    monkeypatch.setattr(auth, 'DFF', dff, raising=False)
    account = account_of(user, assume_role_arn=make_role(aws, user))
    session, _ = identity(account)
    first = session.get_credentials().get_frozen_credentials()
    key = session_key(dff)
    value = dff.CACHE.data[key]
    assert value.startswith('v1:'), 'the session is not sealed'
    record = auth._unseal(auth._seal_keys(user['ak_secret']), value)
    # Another secret: the very session, still valid, that only its sealer may use.
    dff.CACHE.data[key] = BAD_SEALS[case](value, lambda other: auth._seal(auth._seal_keys(other), record))
    with caplog.at_level(logging.WARNING, logger='integration'), aws.recording() as calls:
        session = auth.get_session(account, region='us-east-1')
    with caplog.at_level(logging.WARNING, logger='integration'), aws.recording() as banner:
        ident = auth.describe_identity(session, account)
        ec2_call(session)
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(lines) == 1 and 'does not open' in lines[0], lines
    assert not cache_leaks([('warning', lines[0])], first.secret_key, first.token, user['ak_secret'])
    # Counted as absent: a new session, which AWS just issued and is not asked about.
    assert [(c['action'], c['access_key']) for c in sts_calls(calls)] == [('AssumeRole', user['ak_id'])]
    fresh = json.loads(auth._unseal(auth._seal_keys(user['ak_secret']), dff.CACHE.data[key]))
    assert fresh['access_key'] != first.access_key
    assert dff.CACHE.data[key + auth.VERIFIED_SUFFIX]
    # Its identity is not known yet: the banner asks, with the new session.
    assert [(c['action'], c['access_key']) for c in sts_calls(banner)] == [
        ('GetCallerIdentity', fresh['access_key'])]
    assert 'assumed-role' in ident['arn']


def test_no_secret_in_logs_or_reprs_at_debug(aws, user, caplog):
    role = make_role(aws, user, external_id='ext-secretless')
    account = mfa_account(aws, user, role, code='135791')
    logging.getLogger('botocore').setLevel(logging.DEBUG)   # the runner resets this
    core.quiet_sdk_loggers()
    with caplog.at_level(logging.DEBUG):
        session, ident = identity(account)
        ec2_call(session)
    frozen = session.get_credentials().get_frozen_credentials()
    secrets = [user['ak_secret'], '135791', frozen.secret_key, frozen.token]
    # moto runs in this process and logs requests verbatim; it is not ours.
    ours = '\n'.join(r.getMessage() for r in caplog.records if not r.name.startswith(('moto', 'werkzeug')))
    assert ours, 'the debug log should say something'
    text = ours + repr(session) + repr(session.get_credentials()) + json.dumps(ident)
    for secret in secrets:
        assert secret not in text
    assert logging.getLogger('botocore').level == logging.WARNING
    assert logging.getLogger('urllib3').level == logging.WARNING


# -- bad input: one clear line, before any AWS call --------------------------------

GOOD = {'ak_id': 'AKIAEXAMPLE000000001', 'ak_secret': 'SECRETexample0000000000000000000000000000'}
ROLE = 'arn:aws:iam::123456789012:role/reader'
SERIAL = 'arn:aws:iam::123456789012:mfa/alice'

BAD_ACCOUNTS = [
    ('not a dict', ['ak_id'], 'must be a dict'),
    ('unknown key', {**GOOD, 'ak_secrte': 'x'}, "account['ak_secrte'] is not a known key; did you mean 'ak_secret'"),
    ('collector key', {**GOOD, 'regions': ['us-east-1']},
     "account['regions'] belongs in collector_configs, not in account: move it there"),
    ('collector key of one collector', {**GOOD, 'targets': 'ALL'},
     "account['targets'] belongs in collector_configs, not in account: move it there"),
    ('unknown key far', {**GOOD, 'zzz': 'x'}, 'known keys:'),
    ('ak_id without secret', {'ak_id': GOOD['ak_id']}, "account['ak_secret'] is missing"),
    ('secret without ak_id', {'ak_secret': GOOD['ak_secret']}, "account['ak_id'] is missing"),
    ('empty ak_id', {**GOOD, 'ak_id': ''}, "account['ak_id'] is empty"),
    ('placeholder ak_id', {**GOOD, 'ak_id': '<AWS AK ID>'}, 'placeholder'),
    ('placeholder secret', {**GOOD, 'ak_secret': '<AWS AK SECRET>'}, "account['ak_secret'] still holds the placeholder"),
    ('ak_id not a string', {**GOOD, 'ak_id': 12345}, "account['ak_id'] must be a string"),
    ('malformed ak_id', {**GOOD, 'ak_id': 'akia-lower'}, "account['ak_id'] is not an access key id"),
    ('token without serial', {**GOOD, 'token_code': '918273'}, "account['serial_number'] is missing"),
    ('serial without token', {**GOOD, 'serial_number': SERIAL}, "account['token_code'] is missing"),
    ('token 5 digits', {**GOOD, 'serial_number': SERIAL, 'token_code': '12345'}, 'exactly 6 digits'),
    ('token letters', {**GOOD, 'serial_number': SERIAL, 'token_code': '12a456'}, 'exactly 6 digits'),
    ('token full-width digits', {**GOOD, 'serial_number': SERIAL, 'token_code': '１２３４５６'},
     'exactly 6 digits, the code the MFA device shows now (got 6 characters, not all of them 0-9)'),
    ('token as int', {**GOOD, 'serial_number': SERIAL, 'token_code': 123456}, "write the code as '012345'"),
    ('serial too short', {**GOOD, 'serial_number': 'abc', 'token_code': '918273'}, "account['serial_number'] must be"),
    ('mfa without keys', {'serial_number': SERIAL, 'token_code': '918273'}, "account['ak_id'] is missing"),
    ('malformed role', {**GOOD, 'assume_role_arn': 'arn:aws:iam::1234:role/x'}, "account['assume_role_arn'] is not a role ARN"),
    ('user arn as role', {**GOOD, 'assume_role_arn': 'arn:aws:iam::123456789012:user/x'}, 'is not a role ARN'),
    ('external id too short', {**GOOD, 'assume_role_arn': ROLE, 'external_id': 'x'}, "account['external_id'] must be 2-1224"),
    ('external id bad chars', {**GOOD, 'assume_role_arn': ROLE, 'external_id': 'a b'}, "account['external_id']"),
    ('session name too long', {**GOOD, 'assume_role_arn': ROLE, 'role_session_name': 'x' * 65}, "account['role_session_name'] must be 2-64"),
    ('session name bad chars', {**GOOD, 'assume_role_arn': ROLE, 'role_session_name': 'a b'}, "account['role_session_name']"),
    ('external id without role', {**GOOD, 'external_id': 'abc'}, "account['assume_role_arn'] is missing"),
    ('duration without session', {**GOOD, 'duration_seconds': 3600}, "account['duration_seconds'] only applies"),
    ('duration too short', {**GOOD, 'assume_role_arn': ROLE, 'duration_seconds': 60}, 'between 900 and 43200'),
    ('duration too long mfa', {**GOOD, 'serial_number': SERIAL, 'token_code': '918273', 'duration_seconds': 200000}, 'between 900 and 129600'),
    ('duration as string', {**GOOD, 'assume_role_arn': ROLE, 'duration_seconds': '3600'}, 'whole number'),
    ('extra_tags not dict', {**GOOD, 'extra_tags': ['a']}, "account['extra_tags'] must be a dict"),
    ('extra_tags value not str', {**GOOD, 'extra_tags': {'team': 5}}, "account['extra_tags']['team'] must be a string"),
    ('extra_tags cloud_provider', {**GOOD, 'extra_tags': {'cloud_provider': 'x'}}, "must not contain 'cloud_provider'"),
    ('extra_tags empty key', {**GOOD, 'extra_tags': {'': 'x'}}, 'keys must be non-empty'),
]


@pytest.mark.parametrize('case,account,expected', BAD_ACCOUNTS, ids=[c[0] for c in BAD_ACCOUNTS])
def test_bad_account(aws, case, account, expected):
    with aws.recording() as calls:
        with pytest.raises(auth.AccountConfigError) as info:
            auth.get_session(account, region='us-east-1')
    message = str(info.value)
    assert expected in message
    assert '\n' not in message
    assert GOOD['ak_secret'] not in message
    assert not ('token_code' in (account if isinstance(account, dict) else {})
                and str(account['token_code']) in message)
    assert calls == [], 'no AWS call may be made for a bad account'
    assert isinstance(info.value, ValueError)


def test_regions_star_takes_the_partition_of_an_mfa_device_arn(aws):
    """Like a role's ARN, a device's names its partition: discovery asks no
    other partition's STS (and the device check cannot stop it there)."""
    account = {**GOOD, 'serial_number': 'arn:aws-cn:iam::123456789012:mfa/alice', 'token_code': '123456'}
    with aws.recording() as calls:
        assert auth.CollectorAccount(account, ['*'])._discover_partition() == 'aws-cn'
    assert calls == []
    with pytest.raises(auth.AccountConfigError, match="MFA device of partition 'aws-cn' but the regions are in 'aws'"):
        auth.CollectorAccount(account, ['us-east-1'])


def test_blank_optional_values_count_as_absent():
    account = {**GOOD, 'assume_role_arn': ROLE, 'external_id': '', 'role_session_name': ''}
    assert auth.validate_account(account) == {**GOOD, 'assume_role_arn': ROLE}
    assert auth.auth_method(account) == 'assume_role'


# -- session lengths (issue 11, item 4) --------------------------------------------

def assume_params(rules):
    return [dict(urllib.parse.parse_qsl(r['body'].decode()))
            for r in rules.proxy.seen if r['action'] == 'AssumeRole']


@pytest.mark.parametrize('limit,asked', [
    (14400, [43200, 21600, 14400]),
    (3600, [43200, 21600, 14400, 7200, 3600]),
], ids=['4h role', '1h role'])
def test_role_session_is_as_long_as_the_role_allows(aws, sts, user, caplog, limit, asked):
    role = make_role(aws, user, max_session=limit)
    account = account_of(user, assume_role_arn=role)
    clock = Clock()
    with caplog.at_level(logging.INFO, logger='integration'), aws.recording() as calls:
        _, ident = identity(account, clock=clock)
    assert sts.assume_durations() == asked
    (accepted,) = sts_calls(calls, 'AssumeRole')
    assert accepted['params']['DurationSeconds'] == str(limit)
    assert 'assumed-role' in ident['arn']
    assert any(role in r.getMessage() and 'MaxSessionDuration' in r.getMessage() for r in caplog.records)
    # Once that session is over, the next one asks for the role's limit at once.
    clock.advance(limit)
    del sts.proxy.seen[:]
    auth.get_session(account, region='us-east-1', clock=clock)
    assert sts.assume_durations() == [limit]


def test_explicit_duration_is_sent_as_is(aws, sts, user):
    role = make_role(aws, user, max_session=14400)
    identity(account_of(user, assume_role_arn=role, duration_seconds=7200))
    assert sts.assume_durations() == [7200]


def test_aws_role_chaining_answer_falls_back_to_one_hour(aws, sts, user):
    role = make_role(aws, user, max_session=43200)
    sts.chained.add(role)       # as if AWS counted these credentials as a role session
    _, ident = identity(account_of(user, assume_role_arn=role))
    assert sts.assume_durations() == [43200, 3600]
    assert 'assumed-role' in ident['arn']


def chained_target(aws, base_role):
    """A role that the instance role's sessions may assume."""
    base_session = f"arn:aws:sts::123456789012:assumed-role/{base_role.split('/')[-1]}/instance"
    target = aws.make_role(unique('target'), base_session, 'aws', max_session=43200)
    aws.client('iam', 'us-east-1').put_role_policy(
        RoleName=base_role.split('/')[-1], PolicyName='assume', PolicyDocument=json.dumps(USER_POLICY))
    return target


def test_role_from_the_instance_role_asks_for_the_hour_of_role_chaining(aws, sts, imds):
    _, base_role = imds
    target = chained_target(aws, base_role)
    sts.chained.add(target)
    _, ident = identity({'assume_role_arn': target})
    assert sts.assume_durations() == [3600], 'role chaining allows 1 h: no other length is asked'
    assert f"assumed-role/{target.split('/')[-1]}/Integration" in ident['arn']


def test_role_from_the_default_chain_is_renewed_with_the_chains_credentials(aws, imds):
    server, base_role = imds
    target = chained_target(aws, base_role)
    clock = Clock()
    with aws.recording() as calls:
        session = auth.get_session({'assume_role_arn': target, 'duration_seconds': 900},
                                   region='us-east-1', clock=clock)
        ec2_call(session)
        clock.advance(700)          # 200 s left: botocore renews (advisory window)
        ec2_call(session)
    assumes = sts_calls(calls, 'AssumeRole')
    assert len(assumes) == 2
    base_key = server.credentials['AccessKeyId']
    assert [c['access_key'] for c in assumes] == [base_key, base_key]


def test_mfa_role_probes_with_the_same_code_then_asks_the_length_at_once(aws, sts, user):
    role = make_role(aws, user, max_session=7200)
    account = mfa_account(aws, user, role)
    clock = Clock()
    with aws.recording() as calls:
        identity(account, clock=clock)
    assert sts.assume_durations() == [43200, 21600, 14400, 7200]
    # AWS refused the lengths, not the code: the same code on each request.
    assert [p['TokenCode'] for p in assume_params(sts)] == ['918273'] * 4
    (accepted,) = sts_calls(calls, 'AssumeRole')
    assert accepted['params']['DurationSeconds'] == '7200'
    clock.advance(7200)
    account['token_code'] = '246801'
    del sts.proxy.seen[:]
    auth.get_session(account, region='us-east-1', clock=clock)
    assert sts.assume_durations() == [7200]


def test_mfa_code_spent_by_a_refused_length_costs_one_code_then_one_hour(aws, user, monkeypatch):
    """The worst case: an AWS that spends a code even on a request it refused
    for its length. The run says a fresh code is needed; the used code is not
    sent again; the next code gets the 1 h every role allows, without probing."""
    rules = StsRules(aws, spend_refused_codes=True)
    monkeypatch.setenv('AWS_ENDPOINT_URL', rules.url)
    try:
        role = make_role(aws, user, max_session=14400)
        account = mfa_account(aws, user, role)
        with pytest.raises(auth.AuthError) as info:
            identity(account)
        message = str(info.value)
        assert 'MultiFactorAuthentication failed' in message and 'fresh code' in message
        assert 'asks the role for 3600 s' in message and '918273' not in message
        assert rules.assume_durations() == [43200, 21600]
        with pytest.raises(auth.AuthError, match='already sent'):
            identity(account)
        assert rules.assume_durations() == [43200, 21600], 'a used code is never sent again'
        account['token_code'] = '112233'
        _, ident = identity(account)
        assert rules.assume_durations() == [43200, 21600, 3600]
        assert 'assumed-role' in ident['arn']
    finally:
        rules.proxy.stop()


# -- used MFA codes, per device (item 5) ---------------------------------------------

@pytest.mark.parametrize('with_role', [True, False], ids=['AssumeRole', 'GetSessionToken'])
def test_used_code_is_not_sent_again_when_the_duration_changes(aws, sts, user, with_role):
    role = make_role(aws, user) if with_role else None
    account = mfa_account(aws, user, role)
    auth.get_session(account, region='us-east-1')
    # As the expiry message suggests: a duration, but still the same code.
    account['duration_seconds'] = 3600
    del sts.proxy.seen[:]
    with aws.recording() as calls:
        with pytest.raises(auth.AuthError) as info:
            auth.get_session(account, region='us-east-1')
    message = str(info.value)
    assert account['serial_number'] in message and 'already used' in message
    assert "fresh code from the device in account['token_code']" in message
    assert '918273' not in message and '\n' not in message
    assert not [r for r in sts.proxy.seen if b'TokenCode' in r['body']], 'the used code was sent again'
    assert sts_calls(calls) == []


# -- cached sessions belong to their base credentials (item 6) ------------------------

def test_default_chain_role_session_is_not_served_to_another_identity(aws, user, monkeypatch):
    role = make_role(aws, user)                  # trusts `user` only
    other = aws.make_user(unique('other'), policy=USER_POLICY)
    monkeypatch.setenv('AWS_ACCESS_KEY_ID', user['ak_id'])
    monkeypatch.setenv('AWS_SECRET_ACCESS_KEY', user['ak_secret'])
    _, ident = identity({'assume_role_arn': role})
    assert 'assumed-role' in ident['arn']
    monkeypatch.setenv('AWS_ACCESS_KEY_ID', other['ak_id'])
    monkeypatch.setenv('AWS_SECRET_ACCESS_KEY', other['ak_secret'])
    with aws.recording() as calls:
        with pytest.raises(auth.AuthError) as info:
            identity({'assume_role_arn': role})
    assert 'sts:AssumeRole: AccessDenied' in str(info.value)
    (assume,) = sts_calls(calls, 'AssumeRole')
    assert assume['access_key'] == other['ak_id']


def test_wrong_secret_is_not_served_the_cached_session(aws, user, monkeypatch):
    dff = FuncDFF()      # Func: every script importing auth shares this scope
    monkeypatch.setattr(auth, 'DFF', dff, raising=False)
    role = make_role(aws, user)
    identity(account_of(user, assume_role_arn=role))
    bad = 'Wrong' + user['ak_secret'][5:]
    with aws.recording() as calls:
        with pytest.raises(auth.AuthError) as info:
            identity(account_of(user, ak_secret=bad, assume_role_arn=role))
    assert 'SignatureDoesNotMatch' in str(info.value) and bad not in str(info.value)
    assert [c['action'] for c in sts_calls(calls)] == ['AssumeRole']
    for key, value in dff.CACHE.data.items():
        for secret in (user['ak_secret'], bad):
            assert secret not in key and secret not in value


# -- bad cache content (item 7) --------------------------------------------------------

GARBAGE = {
    'list': [],
    'string': 'hello',
    'number': 42,
    'empty dict': {},
    'wrong types': {'access_key': 5, 'secret_key': None, 'token': [], 'expiry_time': 'tomorrow',
                    'issued': 1, 'codes': 'none', 'duration_seconds': 'long', 'method': 1},
}


@pytest.mark.parametrize('shape', list(GARBAGE), ids=list(GARBAGE))
def test_cache_entries_of_unexpected_shape_count_as_absent(aws, sts, user, monkeypatch, caplog, shape):
    dff = FuncDFF()
    monkeypatch.setattr(auth, 'DFF', dff, raising=False)
    role = make_role(aws, user, max_session=7200)
    account = mfa_account(aws, user, role)
    identity(account)
    planted = [key for key in dff.CACHE.data if key.startswith('integration_aws_auth:')]
    assert len(planted) >= 3        # the session, the used codes, the identity, the role's length
    for key in planted:
        dff.CACHE.data[key] = json.dumps(GARBAGE[shape])
    account['token_code'] = '564738'     # the record of the used one is gone with the rest
    with caplog.at_level(logging.WARNING, logger='integration'), aws.recording() as calls:
        session, ident = identity(account)
        ec2_call(session)
    warnings = [r.getMessage() for r in caplog.records if 'unexpected shape' in r.getMessage()]
    assert warnings and len(warnings) == len(set(warnings)), warnings   # each entry once
    assert all('564738' not in w and user['ak_secret'] not in w for w in warnings)
    assert 'assumed-role' in ident['arn']
    assert [c['params']['TokenCode'] for c in sts_calls(calls, 'AssumeRole')] == ['564738']
    # The planted session counted as absent: a new one, not checked (just
    # issued); only the banner asks who it is (the identity entry was planted too).
    fresh = session.get_credentials().get_frozen_credentials().access_key
    assert [(c['action'], c['access_key']) for c in sts_calls(calls)] == [
        ('AssumeRole', user['ak_id']), ('GetCallerIdentity', fresh)]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger='integration'), aws.recording() as calls:
        identity(account)
    assert not [r for r in caplog.records if 'unexpected shape' in r.getMessage()]
    assert sts_calls(calls) == [], 'the replacement is reused without any STS call'


def plant_unknown_session(dff, base_secret, verified=False):
    """Replace the cached session's keys with keys AWS does not know (sealed
    as the module seals them, so that only AWS can refuse them). Unless
    `verified`, its verified flag goes too, as when the last check is
    VERIFY_INTERVAL old: the next run shows the session to AWS."""
    key = session_key(dff)
    keys = auth._seal_keys(base_secret)
    record = json.loads(auth._unseal(keys, dff.CACHE.data[key]))
    record.update(access_key='ASIAEXAMPLEUNKNOWN000', secret_key='unknown-secret-key',
                  token='unknown-session-token')
    dff.CACHE.data[key] = auth._seal(keys, json.dumps(record))
    assert dff.CACHE.data.get(key + auth.VERIFIED_SUFFIX), 'the session had been verified'
    if not verified:
        dff.CACHE.delete(key + auth.VERIFIED_SUFFIX)


def assert_replaced_once(aws, account, user):
    """A run shows the planted (refused) session to STS, then assumes the role
    once with the user's keys and works: its session."""
    with aws.recording() as calls:
        session, ident = identity(account)
        ec2_call(session)
    actions = [(c['action'], c['access_key']) for c in sts_calls(calls)]
    assert actions[:2] == [('GetCallerIdentity', 'ASIAEXAMPLEUNKNOWN000'), ('AssumeRole', user['ak_id'])]
    assert len(sts_calls(calls, 'AssumeRole')) == 1
    assert 'assumed-role' in ident['arn']
    return session


def test_refused_cached_session_is_replaced_once(aws, user, monkeypatch, caplog):
    dff = FuncDFF()
    monkeypatch.setattr(auth, 'DFF', dff, raising=False)
    role = make_role(aws, user)
    account = account_of(user, assume_role_arn=role)
    identity(account)
    plant_unknown_session(dff, user['ak_secret'])
    with caplog.at_level(logging.WARNING, logger='integration'):
        session = assert_replaced_once(aws, account, user)
    (line,) = [r.getMessage() for r in caplog.records if 'refused the cached' in r.getMessage()]
    assert 'InvalidClientTokenId' in line and 'unknown-secret-key' not in line
    # The replacement is marked verified: the next run asks STS nothing.
    assert dff.CACHE.data[session_key(dff) + auth.VERIFIED_SUFFIX]
    with aws.recording() as calls:
        session, _ = identity(account)
        ec2_call(session)
    assert sts_calls(calls) == []


def test_refused_session_checked_within_the_hour_is_caught_by_the_next_check(aws, user, monkeypatch):
    """The accepted cost of checking at most every VERIFY_INTERVAL: a session
    AWS stopped taking since its last check is used as it is, and fails the
    run's calls, until its flag expires (at most VERIFY_INTERVAL later); the
    first run after that drops and replaces it, once."""
    dff = FuncDFF()
    monkeypatch.setattr(auth, 'DFF', dff, raising=False)
    account = account_of(user, assume_role_arn=make_role(aws, user))
    identity(account)
    plant_unknown_session(dff, user['ak_secret'], verified=True)
    flag = session_key(dff) + auth.VERIFIED_SUFFIX
    assert dff.CACHE.ttl[flag] == auth.VERIFY_INTERVAL
    with aws.recording() as calls:
        session = auth.get_session(account, region='us-east-1')
        with pytest.raises(ClientError) as info:
            ec2_call(session)
    assert sts_calls(calls) == [], 'within the hour the cached session is not shown to AWS'
    assert session.get_credentials().get_frozen_credentials().access_key == 'ASIAEXAMPLEUNKNOWN000'
    assert info.value.response['Error']['Code'] in ('AuthFailure', 'InvalidClientTokenId')
    dff.CACHE.delete(flag)                      # VERIFY_INTERVAL later, Redis drops the flag
    assert_replaced_once(aws, account, user)


def test_refused_cached_mfa_session_asks_for_a_fresh_code(aws, sts, user, monkeypatch):
    dff = FuncDFF()
    monkeypatch.setattr(auth, 'DFF', dff, raising=False)
    role = make_role(aws, user)
    account = mfa_account(aws, user, role)
    identity(account)
    plant_unknown_session(dff, user['ak_secret'])
    del sts.proxy.seen[:]
    with pytest.raises(auth.AuthError) as info:
        identity(account)
    message = str(info.value)
    assert 'AWS refused the cached MFA session' in message and 'InvalidClientTokenId' in message
    assert account['serial_number'] in message and 'fresh code' in message and '918273' not in message
    assert not [r for r in sts.proxy.seen if b'TokenCode' in r['body']], 'the used code was sent again'
    account['token_code'] = '372615'
    with aws.recording() as calls:
        session, _ = identity(account)
        ec2_call(session)
    (assume,) = sts_calls(calls, 'AssumeRole')
    assert assume['params']['TokenCode'] == '372615'


def earlier_layout_key(account, method):
    """Where the version before sessions were bound to the base credentials
    filed an account's session."""
    return 'integration_aws_auth:' + auth._hash(
        method, account['ak_id'], account.get('assume_role_arn'), None, 'Integration',
        account['serial_number'], None, 'aws')


def earlier_used_code(account):
    return hmac.new(account['ak_secret'].encode(),
                    f"{account['serial_number']}|{account['token_code']}".encode(),
                    hashlib.sha256).hexdigest()


@pytest.mark.parametrize('expired', [False, True], ids=['fresh', 'expired'])
def test_mfa_session_of_the_earlier_cache_layout(aws, user, monkeypatch, expired):
    """Upgrading must neither cost a running MFA session nor send its used code again."""
    dff = FuncDFF()
    monkeypatch.setattr(auth, 'DFF', dff, raising=False)
    role = make_role(aws, user)
    account = mfa_account(aws, user, role)
    creds = aws.assume(role, user, 'us-east-1')
    clock = Clock()
    if expired:
        clock.advance(4000)
    old_key = earlier_layout_key(account, 'mfa_assume_role')
    dff.CACHE.data[old_key] = json.dumps({
        'access_key': creds['AccessKeyId'], 'secret_key': creds['SecretAccessKey'],
        'token': creds['SessionToken'], 'expiry_time': auth._format_time(creds['Expiration']),
        'issued': auth._format_time(datetime.datetime.now(UTC)), 'used_code': earlier_used_code(account)})
    with aws.recording() as calls:
        if expired:
            with pytest.raises(auth.AuthError, match='expired at'):
                identity(account, clock=clock)
        else:
            _, ident = identity(account, clock=clock)
            assert ident['arn'].endswith('/instance')
    assert sts_calls(calls, 'AssumeRole') == []
    # Adopted once: the plain entry is gone, the session is sealed.
    assert old_key not in dff.CACHE.data
    leaks = cache_leaks(dff_texts(dff), creds['AccessKeyId'], creds['SecretAccessKey'],
                        creds['SessionToken'], account['ak_secret'])
    assert not leaks, leaks
    assert bool(session_entries(dff)) is not expired
    # The next run neither sends the used code nor loses the session.
    with aws.recording() as calls:
        if expired:
            with pytest.raises(auth.AuthError, match='expired at'):
                identity(account, clock=clock)
        else:
            identity(account, clock=clock)
    assert sts_calls(calls, 'AssumeRole') == []


def test_plain_session_entry_of_the_version_before_sealing_is_sealed_in_place(aws, sts, user,
                                                                            monkeypatch):
    """The version just before sealing filed plain JSON under today's key: an
    upgrade reads it once (an MFA session keeps running, its code is not sent
    again), then seals it."""
    dff = FuncDFF()
    monkeypatch.setattr(auth, 'DFF', dff, raising=False)
    role = make_role(aws, user)
    account = mfa_account(aws, user, role)
    session, _ = identity(account)
    frozen = session.get_credentials().get_frozen_credentials()
    key = session_key(dff)
    plain = auth._unseal(auth._seal_keys(user['ak_secret']), dff.CACHE.data[key])
    dff.CACHE.data[key] = plain
    dff.CACHE.delete(key + auth.VERIFIED_SUFFIX)     # that version wrote none
    assert frozen.secret_key in plain
    del sts.proxy.seen[:]
    with aws.recording() as calls:
        again, _ = identity(account)
    # Shown to AWS once (no flag yet), not renewed.
    assert [(c['action'], c['access_key']) for c in sts_calls(calls)] == [
        ('GetCallerIdentity', frozen.access_key)]
    assert not [r for r in sts.proxy.seen if b'TokenCode' in r['body']], 'the used code was sent again'
    assert again.get_credentials().get_frozen_credentials().access_key == frozen.access_key
    assert dff.CACHE.data[key].startswith('v1:')
    assert not cache_leaks(dff_texts(dff), frozen.access_key, frozen.secret_key, frozen.token)


# -- retries of the collector's clients (item 4) ---------------------------------------

THROTTLE = ('status', 503, ec2_error('RequestLimitExceeded', 'Request limit exceeded.'))
SDK_STANDARD_2 = {'AWS_MAX_ATTEMPTS': '2', 'AWS_RETRY_MODE': 'standard'}


@pytest.mark.parametrize('configs,env,config_file,attempts', [
    ({'max_attempts': 2, 'retry_mode': 'standard'}, {}, None, 2),
    ({}, SDK_STANDARD_2, None, 2),
    ({}, {}, '[default]\nmax_attempts = 2\nretry_mode = standard\n', 2),
    ({'max_attempts': 3, 'retry_mode': 'standard'}, SDK_STANDARD_2, None, 3),
], ids=['max_attempts counts attempts', 'environment over our default',
        'config file over our default', 'collector_configs over the environment'])
def test_max_attempts_of_a_throttled_request(emulator, user, monkeypatch, tmp_path,
                                             configs, env, config_file, attempts):
    proxy = FaultProxy(emulator.url, lambda r: THROTTLE if r['action'] == 'DescribeInstances' else None)
    monkeypatch.setenv('AWS_ENDPOINT_URL', proxy.url)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    if config_file:
        path = tmp_path / 'aws-config'
        path.write_text(config_file)
        monkeypatch.setenv('AWS_CONFIG_FILE', str(path))
    try:
        collector = ec2.DataCollector(account_of(user), {'regions': ['us-east-1'], **configs})
        (result,) = collector.check()
    finally:
        proxy.stop()
    assert not result['ok'] and 'RequestLimitExceeded' in result['reason']
    assert len([r for r in proxy.seen if r['action'] == 'DescribeInstances']) == attempts


def test_a_wrong_secret_with_mfa_does_not_spend_the_code(aws, user):
    """AWS refuses the signature before it judges the code: the line names the
    keys, not the code, and the same code works once the secret is fixed."""
    role = make_role(aws, user)
    good = mfa_account(aws, user, role)
    wrong = dict(good, ak_secret='x' * 40)
    with pytest.raises(auth.AuthError) as info:
        identity(wrong)
    line = str(info.value)
    assert "check account['ak_id'] and account['ak_secret']" in line
    assert 'has now been used' not in line and 'fresh code' not in line
    assert wrong['ak_secret'] not in line and good['token_code'] not in line
    with aws.recording() as calls:
        identity(good)
    (assume,) = sts_calls(calls, 'AssumeRole')
    assert assume['params']['TokenCode'] == good['token_code']



def test_a_kept_session_refused_in_every_region_is_replaced_in_the_same_run(aws, user, caplog,
                                                                          monkeypatch):
    """Revoked early, a kept role session is refused by every region
    (AuthFailure) although its hourly check is not due: it is dropped and the
    run collects once more with a new session, which AWS takes."""
    import integration_aws_ec2__main as ec2
    import integration_local.runtime as local_runtime
    from servers import FaultProxy, ec2_error
    caplog.set_level('INFO', logger='integration')
    role = make_role(aws, user)
    account = account_of(user, assume_role_arn=role)
    sink = local_runtime.LineProtocolWriter(open(os.devnull, 'w'), 'null')
    local_runtime.install(local_runtime.LocalDFF(output=sink))
    regions = {'regions': ['us-east-1', 'us-west-2']}
    with aws.recording() as calls:
        core.Runner(ec2.DataCollector(account, regions), force=True).run()
    (old_key,) = {c['access_key'] for c in calls if c['service'] == 'ec2'}
    refusing = FaultProxy(aws.url, lambda r: ('status', 401, ec2_error(
        'AuthFailure', 'AWS was not able to validate the provided access credentials'))
        if r['service'] == 'ec2' and r['access_key'] == old_key else None)
    try:
        monkeypatch.setenv('AWS_ENDPOINT_URL', refusing.url)
        summary = core.Runner(ec2.DataCollector(account, regions), force=True).run()
    finally:
        refusing.stop()
    assert 'AWS refused the kept session in every region (AuthFailure): dropped; collecting once ' \
        'more with a new one' in caplog.text
    assert [r['action'] for r in refusing.seen if r['service'] == 'sts'] == ['AssumeRole']
    assert summary['ok'] and [r['error'] for r in summary['collectors'][0]['regions']] == [None, None]
    assert {r['access_key'] for r in refusing.seen if r['service'] == 'ec2'} - {old_key}, \
        'the second round used the new session'


def test_a_failed_identity_call_is_asked_once_a_run_and_again_the_next(monkeypatch):
    """Every caller of a run (the Runner, an Organization's listing) gets the
    failed identity call's error; none asks AWS again. The next run does."""
    asked = []

    def refused(*args, **kwargs):
        asked.append(1)
        raise auth.AuthError('sts:GetCallerIdentity: InvalidClientTokenId')
    monkeypatch.setattr(auth, 'describe_identity', refused)
    monkeypatch.setattr(auth, 'take_client', lambda *args: object())
    aws = auth.CollectorAccount({'ak_id': 'AKIAEXAMPLE000000001', 'ak_secret': 'x' * 40},
                                ['us-east-1'])
    monkeypatch.setattr(aws, 'session', lambda: type('S', (), {'region_name': 'us-east-1'})())
    watching = type('C', (), {'watch': staticmethod(lambda client: client),
                              'outcome': staticmethod(lambda future, what: future.exception())})()
    aws.start_identity(watching)
    for _ in range(3):
        with pytest.raises(auth.AuthError, match='InvalidClientTokenId'):
            aws.identity()
    assert len(asked) == 1
    aws.start_identity(watching)        # the next run
    with pytest.raises(auth.AuthError):
        aws.identity()
    assert len(asked) == 2
