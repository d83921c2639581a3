"""Organization benchmark (issue 10 item 4): one EC2 collector over every
member account of an AWS Organization (account['member_role_name']), through
Runner.run as users run it, against one account after another and against a
lower bound, on a fast fake AWS on loopback with injected latency.

    python bench/bench_organizations.py            # 50 accounts x 3 regions x 20, 100 ms; ~2.5 min
    python bench/bench_organizations.py --quick    # one round, 20 accounts: a smoke run (~30 s)
    python bench/bench_organizations.py --code /tmp/wt-org --code .   # checkouts side by side
    python bench/bench_organizations.py --profile  # also: where a warm run's CPU goes

The fake (a process of its own, as in bench_ec2.py) answers, each after the
latency:
  sts:AssumeRole           credentials whose access key id names the member
                           account (ASIA + its 12 digits + BNCH), a session
                           token of realistic length, the expiry asked for;
  sts:GetCallerIdentity    who the signing key is (the management user, or
                           the member role's session);
  organizations:ListAccounts   (JSON protocol) 20 accounts a page, NextToken;
                           the size of the Organization is read from the
                           management key id (AKIAORG<n>EXAMPLE);
  ec2:DescribeInstances    the pages of bench_ec2.make_pages (about 4.5 KB of
                           XML an instance) for the region of the request's
                           SigV4 scope; the account is told from the access
                           key id of its Authorization header, and a page asked
                           with anything but a member session is counted as
                           `foreign` (must be 0).
It counts the calls of each action; the measured process asks for them
between runs, so the calls per run are counted at the fake.

What is measured, each figure the median of --repeat rounds; in each round
every measured process is fresh (fork and exec from this process, never a
child of the fake), imports its modules, loads the service models of sts,
organizations and ec2 (what a long-lived Func worker has loaded: warm-up, not
measured), then runs twice with one INTEGRATION_STATE_DIR (temporary, empty
at the start) and INTEGRATION_FORCE=1 (the 15-minute skip off), a full
gc.collect() before each run (not measured):
  ours         Runner(ec2.DataCollector({'ak_id': 'AKIAORG000050EXAMPLE', 'ak_secret': ...,
               'member_role_name': 'reader'}, {'regions': 3 regions})).run(),
               line protocol to /dev/null (LocalDFF + LineProtocolWriter), the
               run's log lines printed (to /dev/null) as users get them.
                 cold: the first run: ListAccounts, every member role assumed;
                 warm: the second run in the same process, member sessions in
                 the credentials cache: it must make 0 STS calls.
  sequential   "one account after another": 50 single-account collectors,
               each a startup script of the user's page with the same
               management keys and assume_role_arn = the member's role
               (arn:aws:iam::<id>:role/reader), each run by its own
               Runner(...).run(), one after another (as 50 Func tasks run one
               at a time). Cold: each assumes its role (the same STS work as
               ours cold, plus one GetCallerIdentity per new role session);
               warm: each reuses its cached session (0 STS), the same work as
               ours warm. Compared: cold with cold, warm with warm.
  small        ours with 10 accounts, for the CPU per extra account:
               (CPU(50) - CPU(10)) / 40 - the parse CPU of one account's
               DescribeInstances pages (3 pages of 20 instances), the parse
               taken with our sessions' parser (auth.FastParserFactory: XML
               structures read from the elements present, a standard-library
               timestamp parser; botocore's default one is shown too).

parse CPU: botocore's own parsers on the same response bytes, timed in the
fake's process between runs (one model and parser per service, as bench_ec2):
the 150 DescribeInstances pages, the 3 ListAccounts pages, the 50 AssumeRole
and the GetCallerIdentity answers.

lower bound = max(chain x latency + parse CPU along the chain, total parse CPU)
  chain = the calls that must follow one another: ListAccounts pages (3) ->
  AssumeRole (cold only) -> one DescribeInstances page: 5 x latency cold, 4
  warm (GetCallerIdentity depends on nothing: not in the chain); total parse
  CPU with botocore's default parser (the one bench_ec2's bound uses).
  Printed beside it: the concurrency floor, ceil(150 pages / 32 workers) x
  latency + the chain before the pages, and the "GIL floor", the chain's
  latency + the parse of every page (all the pages are parsed in one process,
  one at a time, and none can arrive before the chain).
  Also printed: sequential wall / ours CPU, the most the speedup over one
  account after another can be in one process (no run takes less wall than
  its CPU: the threads take turns at the GIL), and ours wall / its CPU.

Goals (issue 10 item 4): wall <= 1.5 x the bound; >= 5 x faster than one
account after another; CPU per extra account <= 0.1 s beyond parsing its
instances.
"""
import argparse
import collections
import datetime
import gc
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request

import bench_ec2        # beside this file: its pages, its fake's process, its result lines

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.dirname(os.path.abspath(__file__))

SCENARIO = {'accounts': 50, 'small': 10, 'per_region': 20, 'latency': 0.100, 'repeat': 3}
QUICK = {'accounts': 20, 'small': 5, 'per_region': 20, 'latency': 0.100, 'repeat': 1}
REGIONS = ['us-east-1', 'eu-west-1', 'ap-southeast-1']
ROLE = 'reader'
SECRET = 'benchmark-secret-not-real'
FIRST_ACCOUNT = 100000000000         # the management account; members follow
ORG_PAGE = 20                        # accounts per ListAccounts page (AWS's maximum)
CONCURRENCY = 32                     # the EC2 collector's pool for an Organization
GOALS = {'bound': 1.5, 'speedup': 5.0, 'cpu_per_account': 0.1}
RESULT = bench_ec2.RESULT
CALLS = ('AssumeRole', 'GetCallerIdentity', 'ListAccounts', 'DescribeInstances')


def management_key(accounts):
    """The management user's access key id; it tells the fake the Organization's size."""
    return f'AKIAORG{accounts:06d}EXAMPLE'


def account_ids(accounts):
    return [f'{FIRST_ACCOUNT + i:012d}' for i in range(accounts)]


def org_account(accounts):
    return {'ak_id': management_key(accounts), 'ak_secret': SECRET, 'member_role_name': ROLE}


def single_account(accounts, account_id):
    return {'ak_id': management_key(accounts), 'ak_secret': SECRET,
            'assume_role_arn': f'arn:aws:iam::{account_id}:role/{ROLE}'}


# -- the fake ---------------------------------------------------------------------------

SCOPE_RE = re.compile(r'Credential=([A-Z0-9]+)/\d{8}/([a-z0-9-]+)/([a-z0-9-]+)/aws4_request')
TOKEN = 'IQoJb3JpZ2luX2VjEBcaCXVzLWVhc3QtMSJHMEUCIQ' + 'bench' * 150     # ~800 chars, as AWS's
STS_NS = 'https://sts.amazonaws.com/doc/2011-06-15/'


def assume_role_xml(account_id, duration, now=None):
    now = now or datetime.datetime.now(datetime.timezone.utc)
    expiry = (now + datetime.timedelta(seconds=duration)).strftime('%Y-%m-%dT%H:%M:%SZ')
    return (f'<AssumeRoleResponse xmlns="{STS_NS}"><AssumeRoleResult><AssumedRoleUser>'
            f'<AssumedRoleId>AROAEXAMPLE{account_id}:Integration</AssumedRoleId>'
            f'<Arn>arn:aws:sts::{account_id}:assumed-role/{ROLE}/Integration</Arn></AssumedRoleUser>'
            f'<Credentials><AccessKeyId>ASIA{account_id}BNCH</AccessKeyId>'
            f'<SecretAccessKey>bench-temporary-secret-{account_id}-not-real</SecretAccessKey>'
            f'<SessionToken>{TOKEN}</SessionToken><Expiration>{expiry}</Expiration></Credentials>'
            '<PackedPolicySize>6</PackedPolicySize></AssumeRoleResult><ResponseMetadata>'
            '<RequestId>bench</RequestId></ResponseMetadata></AssumeRoleResponse>').encode()


def caller_identity_xml(key_id):
    if key_id.startswith('ASIA'):
        account_id = key_id[4:16]
        arn = f'arn:aws:sts::{account_id}:assumed-role/{ROLE}/Integration'
        user = f'AROAEXAMPLE{account_id}:Integration'
    else:
        account_id, arn, user = f'{FIRST_ACCOUNT:012d}', f'arn:aws:iam::{FIRST_ACCOUNT:012d}:user/bench', 'AIDAEXAMPLE'
    return (f'<GetCallerIdentityResponse xmlns="{STS_NS}"><GetCallerIdentityResult><Arn>{arn}</Arn>'
            f'<UserId>{user}</UserId><Account>{account_id}</Account></GetCallerIdentityResult>'
            '<ResponseMetadata><RequestId>bench</RequestId></ResponseMetadata>'
            '</GetCallerIdentityResponse>').encode()


def list_accounts_json(accounts, token):
    start = int(token or 0)
    ids = account_ids(accounts)
    page = [{'Id': a, 'Arn': f'arn:aws:organizations::{FIRST_ACCOUNT:012d}:account/o-bench/{a}',
             'Email': f'aws+{a}@example.com', 'Name': f'bench-{a}', 'Status': 'ACTIVE',
             'JoinedMethod': 'INVITED' if n else 'CREATED', 'JoinedTimestamp': 1.6e9 + n}
            for n, a in enumerate(ids[start:start + ORG_PAGE], start)]
    out = {'Accounts': page}
    if start + ORG_PAGE < len(ids):
        out['NextToken'] = str(start + ORG_PAGE)
    return json.dumps(out).encode()


class FakeAws:
    """STS, Organizations and EC2 on loopback, each answer after `latency`."""

    def __init__(self, per_region, latency):
        import http.server
        self.pages = {region: bench_ec2.make_pages(per_region, region) for region in REGIONS}
        self.latency = latency
        self.lock = threading.Lock()
        self._reset()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = 'HTTP/1.1'

            def log_message(self, *args):
                pass

            def do_GET(self):
                url = urllib.parse.urlsplit(self.path)
                query = dict(urllib.parse.parse_qsl(url.query))
                if url.path == '/bench/calls':
                    data = outer.take_calls()
                elif url.path == '/bench/parse':
                    data = outer.parse_seconds(int(query['accounts']), query.get('code') or ROOT)
                else:
                    return self._answer(404, b'', 'text/plain')
                self._answer(200, json.dumps(data).encode(), 'application/json')

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get('Content-Length', 0)))
                scope = SCOPE_RE.search(self.headers.get('Authorization', ''))
                key_id, region = (scope.group(1), scope.group(2)) if scope else ('', '')
                target = self.headers.get('X-Amz-Target', '')
                params = {} if target else dict(urllib.parse.parse_qsl(body.decode()))
                action = target.rpartition('.')[2] or params.get('Action', '?')
                outer.count(action, key_id, region)
                time.sleep(outer.latency)
                if action == 'ListAccounts':
                    size = int(key_id[7:13]) if key_id.startswith('AKIAORG') else 0
                    token = json.loads(body or b'{}').get('NextToken')
                    return self._answer(200, list_accounts_json(size, token), 'application/x-amz-json-1.1')
                if action == 'AssumeRole':
                    account_id = params['RoleArn'].split(':')[4]
                    return self._answer(200, assume_role_xml(account_id, int(params.get('DurationSeconds', 3600))),
                                        'text/xml')
                if action == 'GetCallerIdentity':
                    return self._answer(200, caller_identity_xml(key_id), 'text/xml')
                if action == 'DescribeInstances':
                    pages = outer.pages[region]
                    return self._answer(200, pages[int(params.get('NextToken') or 0)], 'text/xml')
                self._answer(400, b'<Response><Errors><Error><Code>InvalidAction</Code></Error></Errors>'
                             b'</Response>', 'text/xml')

            def _answer(self, status, data, content_type):
                self.send_response(status)
                self.send_header('Content-Type', content_type)
                self.send_header('Content-Length', str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        class Server(http.server.ThreadingHTTPServer):
            daemon_threads = True
            request_queue_size = 512

        self.server = Server(('127.0.0.1', 0), Handler)
        self.url = f'http://127.0.0.1:{self.server.server_address[1]}'

    def _reset(self):
        self.calls = collections.Counter()
        self.described = set()         # (account, region) of the member sessions' pages
        self.foreign = 0               # pages asked with anything but a member session

    def count(self, action, key_id, region):
        with self.lock:
            self.calls[action] += 1
            if action == 'DescribeInstances':
                if key_id.startswith('ASIA'):
                    self.described.add((key_id[4:16], region))
                else:
                    self.foreign += 1

    def take_calls(self):
        with self.lock:
            out = dict(self.calls)
            out.update(accounts_described=len({a for a, _ in self.described}),
                       account_regions=len(self.described), foreign=self.foreign)
            self._reset()
        return out

    def parse_seconds(self, accounts, code_root):
        """botocore's parse CPU of the answers of a cold run with `accounts`
        accounts, on the same bytes: with botocore's default parsers and with
        the ones our sessions use (auth.FastParserFactory: XML structures read
        from the elements present, a standard-library timestamp parser)."""
        import botocore.parsers
        import botocore.session
        if code_root not in sys.path:
            sys.path.insert(0, code_root)
        import integration_aws_auth
        session = botocore.session.Session()
        ids = account_ids(accounts)
        now = datetime.datetime.now(datetime.timezone.utc)
        answers = {
            'DescribeInstances': ('ec2', [self.pages[r][i] for _ in ids for r in REGIONS
                                          for i in range(len(self.pages[r]))]),
            'ListAccounts': ('organizations', [list_accounts_json(accounts, t)
                                               for t in range(0, accounts, ORG_PAGE)]),
            'AssumeRole': ('sts', [assume_role_xml(a, 43200, now) for a in ids]),
            'GetCallerIdentity': ('sts', [caller_identity_xml(management_key(accounts))]),
        }
        out = {}
        for label in ('default', 'ours'):
            factory = botocore.parsers.ResponseParserFactory()
            if label == 'ours':     # what our sessions register (a checkout older than it: its timestamps)
                factory = getattr(integration_aws_auth, 'FastParserFactory', type(factory))()
                factory.set_parser_defaults(timestamp_parser=integration_aws_auth.fast_timestamp)
            figures = out[label] = {}
            for action, (service, bodies) in answers.items():
                model = session.get_service_model(service)
                shape = model.operation_model(action).output_shape
                parser = factory.create_parser(model.metadata['protocol'])
                seconds = []
                for body in bodies:
                    start = time.process_time()
                    parser.parse({'body': body, 'headers': {}, 'status_code': 200}, shape)
                    seconds.append(time.process_time() - start)
                figures[action] = sum(seconds)
                figures[action + '_max'] = max(seconds)
                figures[action + '_count'] = len(seconds)
        return out


def serve_fake(per_region, latency):
    """--serve-fake: the fake, until stdin closes."""
    fake = FakeAws(per_region, latency)
    threading.Thread(target=fake.server.serve_forever, daemon=True).start()
    print(RESULT + json.dumps({'url': fake.url}), flush=True)
    sys.stdin.read()


# -- a measured process -----------------------------------------------------------------

def measured(spec):
    """--child: a cold and a warm run in this fresh process; figures on stdout."""
    kind, root, accounts = spec['kind'], spec['root'], spec['accounts']
    sys.path[:] = [root] + [p for p in sys.path if os.path.abspath(p or '.') not in (ROOT, HERE)]
    os.environ.update({'AWS_ENDPOINT_URL': spec['url'], 'AWS_SHARED_CREDENTIALS_FILE': os.devnull,
                       'AWS_CONFIG_FILE': os.devnull, 'AWS_EC2_METADATA_DISABLED': 'true',
                       'INTEGRATION_FORCE': '1', 'INTEGRATION_STATE_DIR': spec['state_dir']})
    for name in ('AWS_ACCESS_KEY_ID', 'AWS_SECRET_ACCESS_KEY', 'AWS_SESSION_TOKEN', 'AWS_PROFILE'):
        os.environ.pop(name, None)
    import integration_aws_auth as auth
    import integration_aws_ec2__main as ec2
    import integration_core__runner as core
    import integration_local.runtime as local_runtime
    for module in (auth, ec2, core, local_runtime):
        if not os.path.abspath(module.__file__).startswith(os.path.join(root, '')):
            raise RuntimeError(f'{module.__name__} came from {module.__file__}, not from {root}')
    # What a long-lived worker has loaded already: the service models (no request).
    warm = auth.new_botocore_session()
    for service in ('sts', 'organizations', 'ec2'):
        warm.create_client(service, region_name=REGIONS[0], aws_access_key_id='AKIAWARMUPEXAMPLE0',
                           aws_secret_access_key='warm-up')
    warm = None
    sink = open(os.devnull, 'w')
    local_runtime.install(local_runtime.LocalDFF(output=local_runtime.LineProtocolWriter(sink, 'null')))
    ask(spec['url'], 'calls')
    profiler = ThreadProfiler() if spec.get('profile') else None
    runs = []
    for phase in ('cold', 'warm'):
        stdout, sys.stdout = sys.stdout, sink       # the run's log lines, printed as users get them
        if profiler and phase == 'warm':
            profiler.start()
        try:
            gc.collect()        # the warm-up's or the cold run's garbage: not this run's cost
            wall, cpu = time.perf_counter(), time.process_time()
            if kind == 'sequential':
                points = 0
                for account_id in account_ids(accounts):
                    collector = ec2.DataCollector(single_account(accounts, account_id), {'regions': REGIONS})
                    points += core.Runner(collector).run()['points_written']
            else:
                collector = ec2.DataCollector(org_account(accounts), {'regions': REGIONS})
                points = core.Runner(collector).run()['points_written']
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        finally:
            if profiler and phase == 'warm':
                profiler.stop()
            sys.stdout = stdout
        runs.append({'phase': phase, 'wall': wall, 'cpu': cpu, 'points': points,
                     'calls': ask(spec['url'], 'calls')})
    out = {'runs': runs}
    if profiler:
        out['profile'] = profiler.report()
    print(RESULT + json.dumps(out), flush=True)


class ThreadProfiler:
    """cProfile of every thread (the collector works in its pool's threads),
    timed by each thread's own CPU clock: a thread waiting for the GIL, a
    lock or a socket counts nothing."""

    PARTS = [
        # label, file part, function: cumulative time of it, as a share
        ('member sessions (member_session: botocore + boto3 Session)', 'integration_aws', 'member_session'),
        ('botocore Session() objects', 'botocore/session.py', '__init__'),
        ('clients made (create_client)', 'botocore/session.py', 'create_client'),
        ('credentials: cache read, unseal, fetch', 'integration_aws', 'refreshable_credentials'),
        ('requests sent (_make_api_call)', 'botocore/client.py', '_make_api_call'),
        ('response parse (botocore parsers)', 'botocore/parsers.py', 'parse'),
        ('SigV4 signing', 'botocore/auth.py', 'add_auth'),
        ('instance -> point', 'integration_aws_ec2', 'instance_to_point'),
        ('line protocol (encode_points)', 'integration_core', 'encode_points'),
        ('Runner log lines (logging)', 'logging/__init__.py', 'handle'),
        ('cache files (FileCache)', 'integration_local/runtime.py', 'get'),
        ('thread start-up (Thread.start)', 'threading.py', 'start'),
        ('gc.collect', '~', "<built-in method gc.collect>"),
    ]
    WAITS = ('acquire', 'recv_into', 'wait', 'sleep', 'select', 'poll', 'connect', 'sendall', ' get')

    def __init__(self):
        import cProfile
        self._cprofile = cProfile
        self.lock = threading.Lock()
        self.profiles = []

    def _hook(self, *args):
        profile = self._cprofile.Profile(time.thread_time)
        with self.lock:
            self.profiles.append(profile)
        sys.setprofile(None)
        profile.enable()

    def start(self):
        self.main = self._cprofile.Profile(time.thread_time)
        threading.setprofile(self._hook)
        self.main.enable()

    def stop(self):
        self.main.disable()
        threading.setprofile(None)

    def report(self):
        import pstats
        stats = pstats.Stats(self.main, stream=io.StringIO())
        for profile in self.profiles:
            try:
                profile.disable()
                stats.add(profile)
            except (TypeError, ValueError):   # a thread that profiled nothing
                pass

        def waiting(key):
            text = pstats.func_std_string(key)
            return '{' in text and any(w in text for w in self.WAITS)
        running = sum(tt for key, (_, _, tt, _, _) in stats.stats.items() if not waiting(key))
        lines = [f'profiled CPU (waits left out): {running:.2f} s; cProfile slows Python code '
                 'several times over: read the shares']
        import botocore.session
        session_line = botocore.session.Session.__init__.__code__.co_firstlineno
        for label, file_part, func in self.PARTS:
            def wanted(filename, line, name):
                if file_part == 'botocore/session.py' and func == '__init__':
                    return filename.endswith(file_part) and line == session_line
                return file_part in filename and name == func
            total = sum(ct for key, (_, _, _, ct, _) in stats.stats.items() if wanted(*key))
            calls = sum(nc for key, (_, nc, _, _, _) in stats.stats.items() if wanted(*key))
            lines.append(f'  {total / running * 100:5.1f}%  {label} ({calls} call(s))')
        stream = io.StringIO()
        stats.stream = stream
        stats.sort_stats('tottime').print_stats(25)
        lines.append('top functions by own time (all threads):')
        lines.extend(l for l in stream.getvalue().splitlines() if l.strip() and 'function calls' not in l)
        return '\n'.join(lines)


def ask(url, what, **query):
    q = ('?' + urllib.parse.urlencode(query)) if query else ''
    with urllib.request.urlopen(f'{url}/bench/{what}{q}', timeout=600) as answer:
        return json.loads(answer.read())


# -- this process: start the others, keep their figures ---------------------------------

def measure(kind, root, fake, accounts, profile=False):
    state_dir = tempfile.mkdtemp(prefix='bench-org-state-')
    try:
        spec = {'kind': kind, 'root': root, 'url': fake.url, 'accounts': accounts,
                'state_dir': state_dir, 'profile': profile}
        done = subprocess.run([sys.executable, os.path.abspath(__file__), '--child', json.dumps(spec)],
                              stdout=subprocess.PIPE, text=True)
        if done.returncode != 0:
            raise RuntimeError(f'the measured process ({kind}, {accounts} accounts, {root}) failed: '
                               f'exit status {done.returncode}')
        return bench_ec2.result_line(done.stdout, 'the measured process')
    finally:
        shutil.rmtree(state_dir, ignore_errors=True)


def bounds(parse, latency, accounts, per_region_pages=1):
    """The lower bounds of a cold and a warm run (see the docstring)."""
    d = parse['default']
    org_pages = math.ceil(accounts / ORG_PAGE)
    pages = accounts * len(REGIONS) * per_region_pages
    out = {}
    for phase, assumes in (('cold', True), ('warm', False)):
        chain_calls = org_pages + (1 if assumes else 0) + per_region_pages
        chain_parse = (d['ListAccounts'] + (d['AssumeRole_max'] if assumes else 0)
                       + d['DescribeInstances_max'] * per_region_pages)
        total = d['DescribeInstances'] + d['ListAccounts'] + (
            d['AssumeRole'] + d['GetCallerIdentity'] if assumes else 0)
        before_pages = (org_pages + (1 if assumes else 0)) * latency
        out[phase] = {
            'chain': chain_calls * latency + chain_parse,
            'parse_cpu': total,
            'bound': max(chain_calls * latency + chain_parse, total),
            'concurrency_floor': before_pages + math.ceil(pages / CONCURRENCY) * latency,
            'gil_floor': before_pages + latency + d['DescribeInstances'],
        }
    return out


def run(scenario, codes, profile):
    accounts, small = scenario['accounts'], scenario['small']
    latency = scenario['latency']
    fake = bench_ec2.Fake(scenario['per_region'], latency, bench=__file__)
    rounds = []
    try:
        for number in range(1, scenario['repeat'] + 1):
            round_ = {'codes': {}}
            for label, root in codes.items():
                parse = ask(fake.url, 'parse', accounts=accounts, code=root)
                here = round_['codes'][label] = {'parse': parse, 'bounds': bounds(parse, latency, accounts)}
                for kind, n in (('ours', accounts), ('small', small), ('sequential', accounts)):
                    started = time.perf_counter()
                    here[kind] = measure('ours' if kind == 'small' else kind, root, fake, n)
                    cold, warm = here[kind]['runs']
                    print(f'  round {number} {label} {kind} ({n} accounts): cold {cold["wall"]:.2f} s wall, '
                          f'{cold["cpu"]:.2f} s CPU; warm {warm["wall"]:.2f} s wall, {warm["cpu"]:.2f} s CPU '
                          f'(process {time.perf_counter() - started:.0f} s)', file=sys.stderr)
            rounds.append(round_)
        profiles = {}
        if profile:
            for label, root in codes.items():
                print(f'  profiling a warm run of {label} (cProfile, every thread) ...', file=sys.stderr)
                profiles[label] = measure('ours', root, fake, accounts, profile=True)['profile']
    finally:
        fake.close()
    return rounds, profiles


def _median(values):
    values = sorted(values)
    return values[len(values) // 2]


def _spread(values, fmt):
    values = sorted(values)
    if len(values) == 1:
        return f'{values[0]:{fmt}}'
    return f'{_median(values):{fmt}} ({values[0]:{fmt}}-{values[-1]:{fmt}})'


def figures(rounds, label, scenario):
    """Per round: the figures the goals are judged on."""
    accounts, small = scenario['accounts'], scenario['small']
    per_account_pages = len(REGIONS)
    out = []
    for whole in rounds:
        r = whole['codes'][label]
        f = {}
        for index, phase in enumerate(('cold', 'warm')):
            ours, seq = r['ours']['runs'][index], r['sequential']['runs'][index]
            little = r['small']['runs'][index]
            b = r['bounds'][phase]
            extra = (ours['cpu'] - little['cpu']) / (accounts - small)
            parse_ours = r['parse']['ours']['DescribeInstances'] / accounts
            parse_default = r['parse']['default']['DescribeInstances'] / accounts
            f[phase] = {
                'wall': ours['wall'], 'cpu': ours['cpu'], 'seq_wall': seq['wall'], 'seq_cpu': seq['cpu'],
                'bound': b['bound'], 'chain': b['chain'], 'parse_cpu': b['parse_cpu'],
                'gil_floor': b['gil_floor'], 'concurrency_floor': b['concurrency_floor'],
                'over_bound': ours['wall'] / b['bound'], 'speedup': seq['wall'] / ours['wall'],
                'cpu_per_account': extra, 'parse_per_account': parse_ours,
                'parse_per_account_default': parse_default,
                'beyond_parse': extra - parse_ours, 'beyond_default_parse': extra - parse_default,
                'calls': ours['calls'], 'seq_calls': seq['calls'], 'small_calls': little['calls'],
                'points': ours['points'], 'seq_points': seq['points'], 'small_points': little['points'],
                'small_cpu': little['cpu'], 'pages': per_account_pages,
            }
        out.append(f)
    return out


def table(rounds, codes, scenario):
    accounts, small = scenario['accounts'], scenario['small']
    instances = accounts * len(REGIONS) * scenario['per_region']
    lines = [f"Scenario: {accounts} accounts x {len(REGIONS)} regions x {scenario['per_region']} instances "
             f"({instances:,}), {scenario['latency'] * 1000:g} ms latency; {scenario['repeat']} round(s): "
             'medians (min-max)', '',
             '| code | run | wall ours / sequential / bound (s) | ours / bound | sequential / ours '
             '| CPU ours / sequential (s) | CPU per extra account / beyond its parse (s) '
             '| API calls ours: AssumeRole, GetCallerIdentity, ListAccounts, DescribeInstances |',
             '|---|---|---|---|---|---|---|---|']
    details, verdicts, checks = [], [], []
    for label in codes:
        per_round = figures(rounds, label, scenario)
        for phase in ('cold', 'warm'):
            xs = [f[phase] for f in per_round]

            def m(key):
                return _median([x[key] for x in xs])

            def calls(c):
                return ', '.join(str(c.get(k, 0)) for k in CALLS)
            lines.append(
                f"| {label} | {phase} | {m('wall'):.2f} / {m('seq_wall'):.2f} / {m('bound'):.2f} "
                f"| {_spread([x['over_bound'] for x in xs], '.2f')}x "
                f"| {_spread([x['speedup'] for x in xs], '.1f')}x "
                f"| {m('cpu'):.2f} / {m('seq_cpu'):.2f} "
                f"| {_spread([x['cpu_per_account'] for x in xs], '.3f')} / "
                f"{_spread([x['beyond_parse'] for x in xs], '.3f')} "
                f"| {calls(xs[-1]['calls'])} |")
            details.append(
                f"{label} {phase}: bound = max(chain {m('chain'):.2f} s, total parse CPU "
                f"{_spread([x['parse_cpu'] for x in xs], '.2f')} s); concurrency floor "
                f"{xs[0]['concurrency_floor']:.2f} s; GIL floor {m('gil_floor'):.2f} s, ours / GIL floor "
                f"{_spread([x['wall'] / x['gil_floor'] for x in xs], '.2f')}x. Sequential calls "
                f"{calls(xs[-1]['seq_calls'])}; {small} accounts: CPU {m('small_cpu'):.2f} s, calls "
                f"{calls(xs[-1]['small_calls'])}. Parse of one account's {xs[0]['pages']} pages: ours "
                f"{m('parse_per_account'):.3f} s, botocore's default {m('parse_per_account_default'):.3f} s "
                f"(CPU per extra account beyond the default parse "
                f"{_spread([x['beyond_default_parse'] for x in xs], '.3f')} s). Ours can take no "
                f"less wall than its CPU: sequential wall / ours CPU "
                f"{_spread([x['seq_wall'] / x['cpu'] for x in xs], '.1f')}x is the most its speedup "
                f"can be; ours wall / its CPU {_spread([x['wall'] / x['cpu'] for x in xs], '.2f')}x")
            ob, sp, cpa = m('over_bound'), m('speedup'), m('beyond_parse')
            sts = xs[-1]['calls'].get('AssumeRole', 0) + xs[-1]['calls'].get('GetCallerIdentity', 0)
            verdicts.append(
                f"{label} {phase}: wall / bound {ob:.2f}x, goal <= {GOALS['bound']}: "
                f"{'met' if ob <= GOALS['bound'] else 'NOT met'}; sequential / ours {sp:.1f}x, goal >= "
                f"{GOALS['speedup']:g}: {'met' if sp >= GOALS['speedup'] else 'NOT met'}; CPU per extra "
                f"account beyond its parse {cpa:.3f} s, goal <= {GOALS['cpu_per_account']}: "
                f"{'met' if cpa <= GOALS['cpu_per_account'] else 'NOT met'}"
                + (f"; STS calls {sts}, goal 0: {'met' if sts == 0 else 'NOT met'}" if phase == 'warm' else ''))
            for x in xs:
                for who, got, n in (('ours', x['points'], accounts), ('sequential', x['seq_points'], accounts),
                                    ('small', x['small_points'], small)):
                    if got != n * len(REGIONS) * scenario['per_region']:
                        checks.append(f'warning: {label} {phase} {who}: {got} points, not '
                                      f"{n * len(REGIONS) * scenario['per_region']}")
                for who, c, n in (('ours', x['calls'], accounts), ('small', x['small_calls'], small),
                                  ('sequential', x['seq_calls'], accounts)):
                    if c.get('foreign') or c.get('account_regions') != n * len(REGIONS):
                        checks.append(f'warning: {label} {phase} {who}: pages of {c.get("account_regions")} '
                                      f'(account, region) pairs, {c.get("foreign")} asked with a '
                                      'non-member session')
    return '\n'.join(lines + [''] + details + [''] + verdicts + checks)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--quick', action='store_true', help='one round, 20 accounts (5 for the small run)')
    parser.add_argument('--repeat', type=int, help='rounds (each figure: their median)')
    parser.add_argument('--accounts', type=int, help='accounts of the Organization (default 50)')
    parser.add_argument('--small', type=int, help='accounts of the small run (default 10)')
    parser.add_argument('--latency-ms', type=float, help='latency of every answer (default 100)')
    parser.add_argument('--per-region', type=int, help='instances per account and region (default 20)')
    parser.add_argument('--code', metavar='DIR', action='append', default=[],
                        help="measure the modules of this checkout instead of this bench's own "
                             '(repeatable: side by side, in every round, each with its own sequential '
                             'baseline)')
    parser.add_argument('--profile', action='store_true',
                        help='also profile a warm run of each checkout (cProfile, every thread)')
    parser.add_argument('--json', metavar='FILE', help='also write the raw figures')
    parser.add_argument('--serve-fake', nargs=2, help=argparse.SUPPRESS)
    parser.add_argument('--child', help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_fake:
        return serve_fake(int(args.serve_fake[0]), float(args.serve_fake[1]))
    if args.child:
        return measured(json.loads(args.child))
    scenario = dict(QUICK if args.quick else SCENARIO)
    for key, value in (('repeat', args.repeat), ('accounts', args.accounts), ('small', args.small),
                       ('per_region', args.per_region),
                       ('latency', args.latency_ms / 1000 if args.latency_ms is not None else None)):
        if value is not None:
            scenario[key] = value
    if not 0 < scenario['small'] < scenario['accounts']:
        parser.error('--small must be below --accounts')
    codes = {}
    for path in args.code or [ROOT]:
        path = os.path.abspath(path)
        codes[os.path.basename(path) if args.code else 'ours'] = path
    started = time.perf_counter()
    rounds, profiles = run(scenario, codes, args.profile)
    print(table(rounds, codes, scenario))
    for label, text in profiles.items():
        print(f'\ncProfile of a warm run, {label}, {scenario["accounts"]} accounts:\n{text}')
    print(f'\n(bench: {time.perf_counter() - started:.0f} s)')
    if args.json:
        with open(args.json, 'w') as f:
            json.dump({'scenario': scenario, 'rounds': rounds, 'profiles': profiles}, f, indent=2)


if __name__ == '__main__':
    main()
