"""EC2 collection benchmark: this collector (through Runner.run, as users run
it) against a naive sequential loop and against the lower bound, on a fast
local fake EC2 endpoint with injected latency.

    python bench/bench_ec2.py            # all scenarios, a table, ~5 minutes
    python bench/bench_ec2.py --quick    # smaller estates, for a smoke run
    python bench/bench_ec2.py --code /tmp/a --code /tmp/b --no-naive
                                         # two checkouts' modules side by
                                         # side, in one invocation
    python bench/bench_ec2.py --scenario 20,20,5 --no-naive
                                         # 20 regions x 20 instances at 5 ms

The fake endpoint serves DescribeInstances pages generated once (realistic
instances of ~4.5 KB of XML) from memory, with NextToken paging, any region,
and a sleep per request; it also answers sts:GetCallerIdentity.

Processes. This one only starts the others and keeps their figures (it never
imports botocore nor holds a page, so its own peak stays small). Each scenario's
fake runs in a process of its own (the pages of 20,000 instances are 90 MB), and
each measurement is a fresh process started from this one (fork and exec),
never a child nor a parent of a fake. Scenarios are run in rounds (every
scenario, and every --code checkout, once per round; --repeat rounds), so a
noisy machine slows alike the runs that are compared. Each figure is the median
of the rounds, with the spread (min-max) beside it.

What is measured
  wall, CPU  of the collection (Runner.run, or the naive loop), after the
             imports and a warm-up collection of the same regions (5-instance
             pages: every model, parser and code path loaded), as in a
             long-lived Func worker; CPU is the whole process's (all threads).
             --cold drops the warm-up: the first run of a fresh process.
  peak RSS   as the kernel reports it for the whole process, imports, warm-up
             and every thread included: ru_maxrss from wait4() when the
             process ends (what /usr/bin/time prints as "Maximum resident set
             size"), cross-checked with VmHWM of /proc/self/status read by the
             process at its end; a disagreement of more than 2 MiB is printed.
             Both count nothing of the fakes: a fake in the measured process
             (or a child of it, or its parent: Linux carries a fork's memory
             into ru_maxrss across exec) would add its pages, 9 MB for 2,000
             instances and 90 MB for 20,000.

lower bound = max(slowest region's pages x (latency + parse time per page),
                  total parse CPU), the parse time measured in the fake's
process with botocore's own (default) parser on the same pages, again at each
round. In the 20-region scenario each region is one page and all answers come
back together after one latency: the parses can only follow it and they take
turns on the GIL, so "gil floor" = max(that bound's first term, latency + total
parse CPU) is printed beside the bound: the lowest wall a collector in one
process, parsing with botocore's default parser, can have there.

Goals (issue 10 item 5): 20-region scenario wall <= 1.3 x the bound; peak RSS
at 20,000 instances <= 1.5 x that at 2,000.
"""
import argparse
import http.server
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

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
LATENCY_GOAL = ('20 regions x 20, 300 ms', 1.3)                          # wall / bound
RSS_GOAL = ('1 region x 2,000, 20 ms', '1 region x 20,000, 20 ms', 1.5)  # peak RSS ratio
REGIONS = ['us-east-1', 'us-east-2', 'us-west-1', 'us-west-2', 'ca-central-1', 'eu-west-1',
           'eu-west-2', 'eu-west-3', 'eu-central-1', 'eu-north-1', 'eu-south-1', 'ap-south-1',
           'ap-northeast-1', 'ap-northeast-2', 'ap-northeast-3', 'ap-southeast-1',
           'ap-southeast-2', 'sa-east-1', 'me-south-1', 'af-south-1']
PAGE = 1000
ACCOUNT = {'ak_id': 'AKIAEXAMPLE000000001', 'ak_secret': 'benchmark-secret-not-real'}
RESULT = 'BENCH-RESULT '
CHILD_TIMEOUT = 900     # seconds a measured process may take

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
        self.small = make_pages(5)[0]       # the warm-up's answer (MaxResults=5)
        self.latency = latency
        self.calls = 0
        self.lock = threading.Lock()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = 'HTTP/1.1'

            def log_message(self, *args):
                pass

            def do_GET(self):
                # The bench's own questions: the calls since the last ask, or
                # botocore's parse time of each page, measured now.
                if self.path == '/bench/calls':
                    with outer.lock:
                        data, outer.calls = outer.calls, 0
                elif self.path == '/bench/parse':
                    data = parse_seconds(outer.pages)
                elif self.path == '/bench/idle':
                    data = parse_after_idle(outer.pages[0], outer.latency)
                else:
                    self.send_error(404)
                    return
                self._answer(json.dumps(data).encode(), 'application/json')

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get('Content-Length', 0)))
                params = dict(urllib.parse.parse_qsl(body.decode()))
                with outer.lock:
                    outer.calls += 1
                time.sleep(outer.latency)
                if params.get('Action') == 'GetCallerIdentity':
                    data = STS_XML.encode()
                elif params.get('MaxResults') == '5':
                    data = outer.small
                else:
                    data = outer.pages[int(params.get('NextToken') or 0)]
                self._answer(data, 'text/xml')

            def _answer(self, data, content_type):
                self.send_response(200)
                self.send_header('Content-Type', content_type)
                self.send_header('Content-Length', str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        super().__init__(('127.0.0.1', 0), Handler)
        self.url = f'http://127.0.0.1:{self.server_address[1]}'


def parse_seconds(pages):
    """botocore's own parse CPU for each page, on the same bytes (its default
    parser, a fresh one with a fresh model: the first parse resolves the
    shapes, as a new client's does)."""
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


def parse_after_idle(body, idle, times=5):
    """botocore's parse of one page back to back, and right after `idle`
    seconds asleep (medians, seconds): a measured run parses its first pages
    after a latency's idle, where the bound's parses are back to back. On a
    virtual machine the caches and TLB may be cold after an idle (measured on
    the development microVM: a 20-instance page 2.6 ms back to back, 12-23 ms
    after 0.1-0.3 s idle, then 2.6 ms again from the next page on)."""
    import botocore.parsers
    import botocore.session
    shape = botocore.session.Session().get_service_model('ec2').operation_model(
        'DescribeInstances').output_shape
    parser = botocore.parsers.create_parser('ec2')
    response = {'body': body, 'headers': {}, 'status_code': 200}

    def once():
        start = time.thread_time()
        parser.parse(response, shape)
        return time.thread_time() - start
    once()
    busy = [once() for _ in range(times)]
    idle_ = []
    for _ in range(times):
        time.sleep(idle)
        idle_.append(once())
    return {'busy': _median(busy), 'after_idle': _median(idle_)}


def serve_fake(per_region, latency):
    """--serve-fake: one scenario's fake, until stdin closes."""
    server = FakeEc2(make_pages(per_region), latency)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    print(RESULT + json.dumps({'url': server.url, 'pages': len(server.pages)}), flush=True)
    sys.stdin.read()


# -- a measured process ---------------------------------------------------------------

def measured(spec):
    """--child: one collection in this fresh process; its figures on stdout."""
    kind, root, regions = spec['kind'], spec['root'], spec['regions']
    # The checkout under test, and nothing of this bench's own checkout.
    sys.path[:] = [root] + [p for p in sys.path if os.path.abspath(p or '.') != ROOT]
    os.environ.update({'AWS_ENDPOINT_URL': spec['url'], 'AWS_SHARED_CREDENTIALS_FILE': os.devnull,
                       'AWS_CONFIG_FILE': os.devnull, 'INTEGRATION_FORCE': '1',
                       'INTEGRATION_STATE_DIR': spec['state_dir']})
    import logging
    logging.getLogger('integration').setLevel(logging.WARNING)
    import integration_aws_auth as auth
    import integration_aws_ec2__main as ec2
    import integration_core__runner as core
    import integration_local.runtime as local_runtime
    for module in (auth, ec2, core, local_runtime):
        if not os.path.abspath(module.__file__).startswith(os.path.join(root, '')):
            raise RuntimeError(f'{module.__name__} came from {module.__file__}, not from {root}')
    after_imports = status_mib('VmRSS')
    if kind == 'ours':
        sink = open(os.devnull, 'w')
        core._RUNTIME['dff'] = local_runtime.LocalDFF(
            output=local_runtime.LineProtocolWriter(sink, 'null'))
    if spec['warm']:
        # What a long-lived worker has done already: a whole collection (of
        # 5-instance pages), so every model, parser and code path is loaded.
        if kind == 'ours':
            core.Runner(ec2.DataCollector(ACCOUNT, {'regions': regions, 'page_size': 5})).run()
        else:
            import boto3
            boto3.session.Session(aws_access_key_id=ACCOUNT['ak_id'],
                                  aws_secret_access_key=ACCOUNT['ak_secret']).client(
                'ec2', region_name=regions[0]).describe_instances(MaxResults=5)
        with urllib.request.urlopen(spec['url'] + '/bench/calls', timeout=60):
            pass                              # the fake counts the measured run's calls only
    wall, cpu = time.perf_counter(), time.process_time()
    if kind == 'ours':
        summary = core.Runner(ec2.DataCollector(ACCOUNT, {'regions': regions})).run()
        points = summary['points_written']
    else:
        # The naive loop: one region after another, paginated, points in a list.
        import boto3
        session = boto3.session.Session(aws_access_key_id=ACCOUNT['ak_id'],
                                        aws_secret_access_key=ACCOUNT['ak_secret'])
        collected = []
        for region in regions:
            client = session.client('ec2', region_name=region)
            for page in client.get_paginator('describe_instances').paginate(
                    PaginationConfig={'PageSize': PAGE}):
                for reservation in page['Reservations']:
                    for instance in reservation['Instances']:
                        collected.append(ec2.instance_to_point(instance, region, {}, 0))
        points = len(collected)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    print(RESULT + json.dumps({'wall': wall, 'cpu': cpu, 'vmhwm_mib': status_mib('VmHWM'),
                               'imports_mib': after_imports, 'points': points}), flush=True)


def status_mib(key):
    """A line of /proc/self/status in MiB: VmHWM is the peak RSS of the
    process's memory since it started (exec), VmRSS the RSS now."""
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith(key + ':'):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f'no {key} in /proc/self/status (Linux only)')


def result_line(text, what):
    for line in reversed(text.splitlines()):
        if line.startswith(RESULT):
            return json.loads(line[len(RESULT):])
    raise RuntimeError(f'{what} gave no result')


# -- this process: start the others, keep their figures -------------------------------

class Fake:
    """A scenario's fake in a process of its own: `bench` --serve-fake
    PER_REGION LATENCY (this bench's, or bench_organizations.py's)."""

    def __init__(self, per_region, latency, bench=__file__):
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(bench), '--serve-fake', str(per_region), str(latency)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        info = result_line(self.proc.stdout.readline(), 'the fake')
        self.url, self.pages = info['url'], info.get('pages')

    def ask(self, what):
        with urllib.request.urlopen(f'{self.url}/bench/{what}', timeout=600) as answer:
            return json.loads(answer.read())

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(30)


def measure(kind, root, fake, regions, warm):
    """One measured process: its figures, with ru_maxrss as wait4() reports it."""
    state_dir = tempfile.mkdtemp(prefix='bench-ec2-state-')
    try:
        fake.ask('calls')
        spec = {'kind': kind, 'root': root, 'url': fake.url, 'regions': regions, 'warm': warm,
                'state_dir': state_dir}
        proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), '--child', json.dumps(spec)],
                                stdout=subprocess.PIPE, text=True)
        watchdog = threading.Timer(CHILD_TIMEOUT, proc.kill)
        watchdog.start()
        try:
            out = proc.stdout.read()
            proc.stdout.close()
            # wait4 rather than Popen.wait: the kernel's rusage of the process.
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            watchdog.cancel()
        proc.returncode = os.WEXITSTATUS(status) if os.WIFEXITED(status) else -1
        if proc.returncode != 0:
            raise RuntimeError(f'the measured process ({kind}, {root}) failed: exit status '
                               f'{proc.returncode}')
        result = result_line(out, 'the measured process')
        result['rss_mib'] = usage.ru_maxrss / 1024        # KiB on Linux
        result['calls'] = fake.ask('calls')
        return result
    finally:
        shutil.rmtree(state_dir, ignore_errors=True)


def run(scenarios, repeat, codes, naive, warm):
    """Every scenario x checkout (and the naive loop) once per round."""
    setups = []
    try:
        for name, n_regions, per_region, latency in scenarios:
            fake = Fake(per_region, latency)
            setups.append({'scenario': name, 'regions': REGIONS[:n_regions], 'latency': latency,
                           'instances': n_regions * per_region, 'pages': fake.pages * n_regions,
                           'fake': fake, 'rounds': [],
                           'runs': {label: [] for label in list(codes) + (['naive'] if naive else [])}})
        for round_ in range(1, repeat + 1):
            for setup in setups:
                parse = setup['fake'].ask('parse')
                n_regions, latency = len(setup['regions']), setup['latency']
                bound = {'parse_cpu': sum(parse) * n_regions,
                         'bound': max(sum(latency + p for p in parse), sum(parse) * n_regions),
                         'gil_floor': max(sum(latency + p for p in parse),
                                          latency + sum(parse) * n_regions)}
                setup['rounds'].append(bound)
                if latency >= 0.1 and round_ == repeat:
                    setup['idle'] = setup['fake'].ask('idle')
                for label, root in codes.items():
                    result = measure('ours', root, setup['fake'], setup['regions'], warm)
                    result.update(bound)
                    setup['runs'][label].append(result)
                    print(f"  round {round_} {setup['scenario']} {label}: wall {result['wall']:.2f} s "
                          f"({result['wall'] / bound['bound']:.2f}x bound {bound['bound']:.2f} s), "
                          f"cpu {result['cpu']:.2f} s, peak RSS {result['rss_mib']:.0f} MiB "
                          f"(VmHWM {result['vmhwm_mib']:.0f})", file=sys.stderr)
                if naive:
                    result = measure('naive', next(iter(codes.values())), setup['fake'],
                                     setup['regions'], warm)
                    result.update(bound)
                    setup['runs']['naive'].append(result)
    finally:
        for setup in setups:
            setup.pop('fake').close()
    for setup in setups:
        setup['median'] = {label: _medians(runs) for label, runs in setup['runs'].items()}
    return setups


def _medians(runs):
    return {key: _median([r[key] for r in runs]) for key in runs[0]}


def _median(values):
    return sorted(values)[len(values) // 2]


def _spread(values, fmt, unit=''):
    """'median (min..max)'."""
    values = sorted(values)
    return f'{_median(values):{fmt}}{unit} ({values[0]:{fmt}}..{values[-1]:{fmt}})'


def table(rows, codes):
    lines = [
        '| scenario | code | instances | wall ours / naive / bound (s) | ours / bound (min..max) '
        '| naive / ours | CPU ours (s) | our CPU over parse | API calls ours (pages) '
        '| peak RSS ours (min..max) / naive (MiB) |',
        '|---|---|---|---|---|---|---|---|---|---|',
    ]
    nan = float('nan')
    for r in rows:
        n = r['median'].get('naive')
        for label in codes:
            o, runs = r['median'][label], r['runs'][label]
            lines.append(
                f"| {r['scenario']} | {label} | {r['instances']:,} "
                f"| {o['wall']:.2f} / {n['wall'] if n else nan:.2f} / {o['bound']:.2f} "
                f"| {_spread([x['wall'] / x['bound'] for x in runs], '.2f', 'x')} "
                f"| {n['wall'] / o['wall'] if n else nan:.2f}x | {o['cpu']:.2f} "
                f"| {_spread([(x['cpu'] - x['parse_cpu']) / x['parse_cpu'] * 100 for x in runs], '.0f', '%')} "
                f"| {o['calls']} ({r['pages']}) "
                f"| {_spread([x['rss_mib'] for x in runs], '.0f')} / {n['rss_mib'] if n else nan:.0f} |")
    lines.append('')
    for r in rows:
        by_parse = sum(b['bound'] == b['parse_cpu'] for b in r['rounds'])
        lines.append(f"{r['scenario']}: the bound is the total parse CPU in {by_parse} of "
                     f"{len(r['rounds'])} rounds, else the slowest region's latency and parse; "
                     f"gil floor {_spread([b['gil_floor'] for b in r['rounds']], '.2f', ' s')}")
        if r.get('idle'):
            lines.append(f"{r['scenario']}: this machine, botocore's parse of one page: "
                         f"{r['idle']['busy'] * 1e3:.1f} ms back to back (as in the bound), "
                         f"{r['idle']['after_idle'] * 1e3:.1f} ms right after {r['latency'] * 1e3:g} "
                         "ms asleep (as a run's first page after the latency)")
    lines.extend(goals(rows, codes))
    return '\n'.join(lines)


def goals(rows, codes):
    """The issue's two goals, per checkout: median (min-max over the rounds)."""
    by_name = {r['scenario']: r for r in rows}
    out = []
    for label in codes:
        name, limit = LATENCY_GOAL
        if name in by_name:
            runs = by_name[name]['runs'][label]
            ratios = [x['wall'] / x['bound'] for x in runs]
            out.append(f'{label}: {name}: wall / bound {_spread(ratios, ".2f", "x")}, goal <= '
                       f"{limit}: {'met' if _median(ratios) <= limit else 'NOT met'}; wall / gil "
                       f"floor {_spread([x['wall'] / x['gil_floor'] for x in runs], '.2f', 'x')}")
        small, big, limit = RSS_GOAL
        if small in by_name and big in by_name:
            a = [x['rss_mib'] for x in by_name[small]['runs'][label]]
            b = [x['rss_mib'] for x in by_name[big]['runs'][label]]
            ratio = _median(b) / _median(a)
            pairs = [y / x for x, y in zip(a, b)]          # each round's pair
            out.append(f'{label}: peak RSS of the whole process, 20,000 / 2,000 instances: '
                       f'{ratio:.2f}x (rounds {min(pairs):.2f}..{max(pairs):.2f}; '
                       f'{_median(b):.0f} / {_median(a):.0f} MiB), goal <= {limit}: '
                       f"{'met' if ratio <= limit else 'NOT met'}")
    for r in rows:
        for label, runs in r['runs'].items():
            for x in runs:
                if abs(x['rss_mib'] - x['vmhwm_mib']) > 2:
                    out.append(f"warning: {r['scenario']} {label}: ru_maxrss {x['rss_mib']:.0f} MiB "
                               f"but VmHWM {x['vmhwm_mib']:.0f} MiB")
                if x['points'] != r['instances']:
                    out.append(f"warning: {r['scenario']} {label}: {x['points']} points, not "
                               f"{r['instances']}")
    own = status_mib('VmHWM')
    lowest = min(x['rss_mib'] for r in rows for runs in r['runs'].values() for x in runs)
    out.append(f'(this process peaked at {own:.0f} MiB, ' + (
        'below every measured one: it adds nothing to their ru_maxrss)' if own < lowest else
        f'not below the lowest measured one ({lowest:.0f} MiB): their ru_maxrss may hold it)'))
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--quick', action='store_true', help='smaller scenarios')
    parser.add_argument('--repeat', type=int, default=3, help='rounds (each figure: their median)')
    parser.add_argument('--only', metavar='TEXT', help='only the scenarios whose name contains TEXT')
    parser.add_argument('--scenario', metavar='R,N,MS', action='append', default=[],
                        help='instead: R regions x N instances each at MS ms of latency '
                             '(repeatable), e.g. 20,20,5 for a bound set by the parse CPU')
    parser.add_argument('--code', metavar='DIR', action='append', default=[],
                        help="measure the modules of this checkout instead of this bench's own "
                             '(repeatable: side by side, in every round)')
    parser.add_argument('--no-naive', dest='naive', action='store_false',
                        help='skip the naive loop (faster)')
    parser.add_argument('--cold', action='store_true',
                        help='no warm-up: each run is the first of its process')
    parser.add_argument('--json', metavar='FILE', help='also write the raw figures')
    parser.add_argument('--serve-fake', nargs=2, help=argparse.SUPPRESS)
    parser.add_argument('--child', help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_fake:
        return serve_fake(int(args.serve_fake[0]), float(args.serve_fake[1]))
    if args.child:
        return measured(json.loads(args.child))
    scenarios = QUICK if args.quick else SCENARIOS
    if args.scenario:
        scenarios = []
        for text in args.scenario:
            regions, per_region, ms = text.split(',')
            regions, per_region = int(regions), int(per_region)
            scenarios.append((f"{regions} region{'s' if regions != 1 else ''} x {per_region:,}, "
                              f'{float(ms):g} ms', regions, per_region, float(ms) / 1000))
    if args.only:
        scenarios = [s for s in scenarios if args.only in s[0]]
    codes = {}
    for path in args.code or [ROOT]:
        path = os.path.abspath(path)
        codes[os.path.basename(path) if args.code else 'ours'] = path
    rows = run(scenarios, args.repeat, codes, args.naive, warm=not args.cold)
    print(table(rows, codes))
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(rows, f, indent=2)


if __name__ == '__main__':
    main()
