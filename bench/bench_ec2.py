"""EC2 collection benchmark: this collector (through Runner.run, as users run
it) against a naive sequential loop and against the lower bound, on a fast
local fake EC2 endpoint with injected latency.

    python bench/bench_ec2.py            # all scenarios, a table, ~2-3 minutes
    python bench/bench_ec2.py --quick    # smaller estates, for a smoke run

The fake endpoint serves DescribeInstances pages generated once (realistic
instances of ~4.5 KB of XML) from memory, with NextToken paging, any region,
and a sleep per request; it also answers sts:GetCallerIdentity. Each
measurement runs in a fresh child process (spawned, so peak RSS is its own;
the peak is reset after imports and warm-up, so it is the run's own),
all in this one invocation; each figure is the median of --repeat runs; ratios
are what to read on a noisy machine.

lower bound = max(slowest region's pages x (latency + parse time per page),
                  total parse CPU), the parse time measured here with
botocore's own parser on the same pages.
"""
import argparse
import http.server
import json
import multiprocessing
import os
import re
import sys
import threading
import time
import urllib.parse

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SCENARIOS = [
    # name, regions, instances per region, latency (s)
    ('20 regions x 20, 300 ms', 20, 20, 0.300),
    ('1 region x 2,000, 20 ms', 1, 2000, 0.020),
    ('1 region x 20,000, 20 ms', 1, 20000, 0.020),
]
QUICK = [
    ('10 regions x 10, 100 ms', 10, 10, 0.100),
    ('1 region x 2,000, 20 ms', 1, 2000, 0.020),
]
REGIONS = ['us-east-1', 'us-east-2', 'us-west-1', 'us-west-2', 'ca-central-1', 'eu-west-1',
           'eu-west-2', 'eu-west-3', 'eu-central-1', 'eu-north-1', 'eu-south-1', 'ap-south-1',
           'ap-northeast-1', 'ap-northeast-2', 'ap-northeast-3', 'ap-southeast-1',
           'ap-southeast-2', 'sa-east-1', 'me-south-1', 'af-south-1']
PAGE = 1000

INSTANCE_XML = """<item><instanceId>{iid}</instanceId><imageId>ami-0abcdef1234567890</imageId>
<instanceState><code>16</code><name>running</name></instanceState>
<privateDnsName>ip-10-0-{a}-{b}.{region}.compute.internal</privateDnsName>
<dnsName>ec2-54-1-{a}-{b}.{region}.compute.amazonaws.com</dnsName><reason/>
<keyName>prod-key</keyName><amiLaunchIndex>0</amiLaunchIndex><productCodes/>
<instanceType>m5.large</instanceType><launchTime>2021-10-26T07:00:44.000Z</launchTime>
<placement><availabilityZone>{region}a</availabilityZone><groupName/><tenancy>default</tenancy></placement>
<kernelId/><monitoring><state>disabled</state></monitoring><subnetId>subnet-0123456789abcdef0</subnetId>
<vpcId>vpc-0123456789abcdef0</vpcId><privateIpAddress>10.0.{a}.{b}</privateIpAddress>
<ipAddress>54.1.{a}.{b}</ipAddress><sourceDestCheck>true</sourceDestCheck>
<groupSet><item><groupId>sg-0123456789abcdef0</groupId><groupName>web</groupName></item>
<item><groupId>sg-0fedcba9876543210</groupId><groupName>ssh</groupName></item></groupSet>
<architecture>x86_64</architecture><rootDeviceType>ebs</rootDeviceType><rootDeviceName>/dev/xvda</rootDeviceName>
<blockDeviceMapping><item><deviceName>/dev/xvda</deviceName><ebs><volumeId>vol-0123456789abcdef0</volumeId>
<status>attached</status><attachTime>2021-10-26T07:00:45.000Z</attachTime><deleteOnTermination>true</deleteOnTermination></ebs></item>
<item><deviceName>/dev/sdf</deviceName><ebs><volumeId>vol-0fedcba9876543210</volumeId><status>attached</status>
<attachTime>2021-10-26T07:00:45.000Z</attachTime><deleteOnTermination>false</deleteOnTermination></ebs></item></blockDeviceMapping>
<virtualizationType>hvm</virtualizationType><clientToken>token-{iid}</clientToken>
<tagSet><item><key>Name</key><value>web-{iid}</value></item><item><key>team</key><value>sre</value></item>
<item><key>env</key><value>prod</value></item><item><key>cost-center</key><value>1234</value></item>
<item><key>owner</key><value>platform@example.com</value></item></tagSet>
<hypervisor>xen</hypervisor><networkInterfaceSet><item><networkInterfaceId>eni-0123456789abcdef0</networkInterfaceId>
<subnetId>subnet-0123456789abcdef0</subnetId><vpcId>vpc-0123456789abcdef0</vpcId><description>Primary network interface</description>
<ownerId>123456789012</ownerId><status>in-use</status><macAddress>02:00:00:00:{a:02x}:{b:02x}</macAddress>
<privateIpAddress>10.0.{a}.{b}</privateIpAddress><privateDnsName>ip-10-0-{a}-{b}.{region}.compute.internal</privateDnsName>
<sourceDestCheck>true</sourceDestCheck><groupSet><item><groupId>sg-0123456789abcdef0</groupId><groupName>web</groupName></item></groupSet>
<attachment><attachmentId>eni-attach-0123456789abcdef0</attachmentId><deviceIndex>0</deviceIndex><status>attached</status>
<attachTime>2021-10-26T07:00:44.000Z</attachTime><deleteOnTermination>true</deleteOnTermination><networkCardIndex>0</networkCardIndex></attachment>
<association><publicIp>54.1.{a}.{b}</publicIp><publicDnsName>ec2-54-1-{a}-{b}.{region}.compute.amazonaws.com</publicDnsName><ipOwnerId>amazon</ipOwnerId></association>
<privateIpAddressesSet><item><privateIpAddress>10.0.{a}.{b}</privateIpAddress><privateDnsName>ip-10-0-{a}-{b}.{region}.compute.internal</privateDnsName>
<primary>true</primary><association><publicIp>54.1.{a}.{b}</publicIp><ipOwnerId>amazon</ipOwnerId></association></item></privateIpAddressesSet>
<ipv6AddressesSet/><interfaceType>interface</interfaceType></item></networkInterfaceSet>
<iamInstanceProfile><arn>arn:aws:iam::123456789012:instance-profile/web</arn><id>AIPAEXAMPLE0000000000</id></iamInstanceProfile>
<ebsOptimized>false</ebsOptimized><enaSupport>true</enaSupport><cpuOptions><coreCount>1</coreCount><threadsPerCore>2</threadsPerCore></cpuOptions>
<capacityReservationSpecification><capacityReservationPreference>open</capacityReservationPreference></capacityReservationSpecification>
<hibernationOptions><configured>false</configured></hibernationOptions><metadataOptions><state>applied</state>
<httpTokens>required</httpTokens><httpPutResponseHopLimit>2</httpPutResponseHopLimit><httpEndpoint>enabled</httpEndpoint>
<httpProtocolIpv6>disabled</httpProtocolIpv6><instanceMetadataTags>disabled</instanceMetadataTags></metadataOptions>
<enclaveOptions><enabled>false</enabled></enclaveOptions><platformDetails>Linux/UNIX</platformDetails>
<usageOperation>RunInstances</usageOperation><usageOperationUpdateTime>2021-10-26T07:00:44.000Z</usageOperationUpdateTime>
<privateDnsNameOptions><hostnameType>ip-name</hostnameType><enableResourceNameDnsARecord>false</enableResourceNameDnsARecord>
<enableResourceNameDnsAAAARecord>false</enableResourceNameDnsAAAARecord></privateDnsNameOptions>
<maintenanceOptions><autoRecovery>default</autoRecovery></maintenanceOptions><currentInstanceBootMode>legacy-bios</currentInstanceBootMode></item>"""

STS_XML = ('<GetCallerIdentityResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">'
           '<GetCallerIdentityResult><Arn>arn:aws:iam::123456789012:user/bench</Arn>'
           '<UserId>AIDAEXAMPLE</UserId><Account>123456789012</Account></GetCallerIdentityResult>'
           '<ResponseMetadata><RequestId>bench</RequestId></ResponseMetadata></GetCallerIdentityResponse>')
SCOPE_RE = re.compile(r'Credential=[^/]+/\d+/([^/]+)/')


def make_pages(count, region='us-east-1', page=PAGE):
    """DescribeInstances response bodies, `page` instances each, one
    reservation per 10 instances, NextToken the next page's index."""
    pages = []
    for start in range(0, count, page):
        items, reservations = [], []
        for n in range(start, min(start + page, count)):
            items.append(INSTANCE_XML.format(iid=f'i-{n:017x}', a=(n // 250) % 250, b=n % 250,
                                             region=region))
            if len(items) == 10 or n == min(start + page, count) - 1:
                reservations.append('<item><reservationId>r-%017x</reservationId><ownerId>123456789012'
                                    '</ownerId><groupSet/><instancesSet>%s</instancesSet></item>'
                                    % (n, ''.join(items)))
                items = []
        following = start // page + 1
        token = f'<nextToken>{following}</nextToken>' if start + page < count else ''
        pages.append(('<?xml version="1.0" encoding="UTF-8"?><DescribeInstancesResponse '
                      'xmlns="http://ec2.amazonaws.com/doc/2016-11-15/"><requestId>bench</requestId>'
                      f'<reservationSet>{"".join(reservations)}</reservationSet>{token}'
                      '</DescribeInstancesResponse>').encode())
    return pages or [b'<?xml version="1.0"?><DescribeInstancesResponse><reservationSet/></DescribeInstancesResponse>']


class FakeEc2(http.server.ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128

    def __init__(self, pages, latency):
        self.pages = pages
        self.latency = latency
        self.calls = 0
        self.lock = threading.Lock()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = 'HTTP/1.1'

            def log_message(self, *args):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get('Content-Length', 0)))
                params = dict(urllib.parse.parse_qsl(body.decode()))
                with outer.lock:
                    outer.calls += 1
                time.sleep(outer.latency)
                if params.get('Action') == 'GetCallerIdentity':
                    data = STS_XML.encode()
                else:
                    data = outer.pages[int(params.get('NextToken') or 0)]
                self.send_response(200)
                self.send_header('Content-Type', 'text/xml')
                self.send_header('Content-Length', str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        super().__init__(('127.0.0.1', 0), Handler)
        self.url = f'http://127.0.0.1:{self.server_address[1]}'


# -- what each child process measures ----------------------------------------------

def _child(kind, url, regions, queue_out):
    os.environ.update({'AWS_ENDPOINT_URL': url, 'AWS_SHARED_CREDENTIALS_FILE': os.devnull,
                       'AWS_CONFIG_FILE': os.devnull, 'INTEGRATION_FORCE': '1'})
    import logging
    logging.getLogger('integration').setLevel(logging.WARNING)
    account = {'ak_id': 'AKIAEXAMPLE000000001', 'ak_secret': 'benchmark-secret-not-real'}
    import integration_core__runner as core
    import integration_local.runtime as local_runtime
    import integration_aws_ec2__main as ec2
    import integration_aws_auth as auth
    # Warm-up: what a long-lived worker has loaded already (service models).
    warm = auth.get_session(account, region=regions[0])
    warm.client('ec2', region_name=regions[0])
    before = _peak_rss_mib(reset=True)
    wall, cpu = time.perf_counter(), time.process_time()
    if kind == 'ours':
        sink = open(os.devnull, 'w')
        dff = local_runtime.LocalDFF(output=local_runtime.LineProtocolWriter(sink, 'null'))
        core._RUNTIME['dff'] = dff
        summary = core.Runner(ec2.DataCollector(account, {'regions': regions})).run()
        points = summary['points_written']
    else:
        # The naive loop: one region after another, paginated, points in a list.
        import boto3
        session = boto3.session.Session(aws_access_key_id=account['ak_id'],
                                        aws_secret_access_key=account['ak_secret'])
        collected = []
        for region in regions:
            client = session.client('ec2', region_name=region)
            for page in client.get_paginator('describe_instances').paginate(
                    PaginationConfig={'PageSize': PAGE}):
                for reservation in page['Reservations']:
                    for instance in reservation['Instances']:
                        collected.append(ec2.instance_to_point(instance, region, {}, 0))
        points = len(collected)
    queue_out.put({'wall': time.perf_counter() - wall, 'cpu': time.process_time() - cpu,
                   'rss_mib': _peak_rss_mib(), 'rss_before_mib': before, 'points': points})


def _peak_rss_mib(reset=False):
    """VmHWM, the peak RSS. reset=True starts it afresh (Linux's clear_refs 5)
    and returns the RSS now, so the peak reported is the run's own, not that
    of the imports and the warm-up."""
    if reset:
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')
    with open('/proc/self/status') as f:
        status = dict(line.split(':', 1) for line in f)
    return int(status['VmRSS' if reset else 'VmHWM'].split()[0]) / 1024


def parse_seconds(pages):
    """botocore's own parse time for each page, on the same bytes."""
    import botocore.parsers
    import botocore.session
    model = botocore.session.Session().get_service_model('ec2')
    shape = model.operation_model('DescribeInstances').output_shape
    parser = botocore.parsers.create_parser('ec2')
    out = []
    for body in pages:
        start = time.process_time()
        parser.parse({'body': body, 'headers': {}, 'status_code': 200}, shape)
        out.append(time.process_time() - start)
    return out


def measure_median(kind, server, regions, repeat):
    """The median of `repeat` fresh-process runs, figure by figure: peak RSS
    in particular varies by tens of MB from run to run (allocator timing)."""
    runs = [measure(kind, server, regions) for _ in range(repeat)]
    return {key: sorted(r[key] for r in runs)[len(runs) // 2] for key in runs[0]}


def measure(kind, server, regions):
    ctx = multiprocessing.get_context('spawn')
    queue_out = ctx.Queue()
    with server.lock:
        server.calls = 0
    proc = ctx.Process(target=_child, args=(kind, server.url, regions, queue_out))
    proc.start()
    result = queue_out.get(timeout=900)
    proc.join(60)
    with server.lock:
        result['calls'] = server.calls - 0
    return result


def run(scenarios, repeat):
    rows = []
    for name, n_regions, per_region, latency in scenarios:
        pages = make_pages(per_region)
        parse = parse_seconds(pages)
        server = FakeEc2(pages, latency)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        regions = REGIONS[:n_regions]
        bound = max(sum(latency + p for p in parse), sum(parse) * n_regions)
        # warm-up requests of each child (one session, one client) are not counted
        ours = measure_median('ours', server, regions, repeat)
        naive = measure_median('naive', server, regions, repeat)
        server.shutdown()
        server.server_close()
        total_parse = sum(parse) * n_regions
        expected_calls = len(pages) * n_regions
        print(f'  {name}: ours {ours}, naive {naive}', file=sys.stderr)
        rows.append({
            'scenario': name, 'instances': n_regions * per_region, 'pages': expected_calls,
            'parse_cpu': total_parse, 'bound': bound, 'ours': ours, 'naive': naive,
            'ours_vs_bound': ours['wall'] / bound, 'naive_vs_ours': naive['wall'] / ours['wall'],
            'overhead': (ours['cpu'] - total_parse) / total_parse,
        })
        print(f'  measured: {name}', file=sys.stderr)
    return rows


def table(rows):
    lines = [
        '| scenario | instances | wall ours / naive / bound (s) | ours / bound | naive / ours '
        '| CPU ours (s) | our CPU over parse | API calls ours (pages) | peak RSS ours / naive (MiB) |',
        '|---|---|---|---|---|---|---|---|---|',
    ]
    for r in rows:
        o, n = r['ours'], r['naive']
        lines.append(
            f"| {r['scenario']} | {r['instances']:,} | {o['wall']:.2f} / {n['wall']:.2f} / {r['bound']:.2f} "
            f"| {r['ours_vs_bound']:.2f}x | {r['naive_vs_ours']:.2f}x | {o['cpu']:.2f} "
            f"| {r['overhead'] * 100:.0f}% | {o['calls']} ({r['pages']}) "
            f"| {o['rss_mib']:.0f} / {n['rss_mib']:.0f} |")
    big = {r['instances']: r['ours']['rss_mib'] for r in rows}
    if 2000 in big and 20000 in big:
        lines.append(f'\npeak RSS 20,000 / 2,000 instances: {big[20000] / big[2000]:.2f}x')
    return '\n'.join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--quick', action='store_true', help='smaller scenarios')
    parser.add_argument('--repeat', type=int, default=3, help='runs per figure (median)')
    parser.add_argument('--only', metavar='TEXT', help='only the scenarios whose name contains TEXT')
    parser.add_argument('--json', metavar='FILE', help='also write the raw figures')
    args = parser.parse_args()
    scenarios = QUICK if args.quick else SCENARIOS
    if args.only:
        scenarios = [s for s in scenarios if args.only in s[0]]
    rows = run(scenarios, args.repeat)
    print(table(rows))
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(rows, f, indent=2)


if __name__ == '__main__':
    main()
