"""Our modules inside the real DataFlux Func worker, as a user runs them.

The README's paste table is published script by script (Func's pre-check runs
each module body), a startup script of scripts/ is published with the
placeholders filled for the test estate (aws-cn, cn-northwest-1, moto with IAM
enforcement on), and its DFF.API function runs as a cron tick's task in one
long-lived worker process. Each test asserts what the user sees: the task's
status, its print log, its exception and traceback, the points DataKit got,
what DFF.CACHE keeps, and the threads and requests left behind.
"""
import http.server
import json
import os
import re
import socket
import threading
import time
import urllib.parse
import urllib.request

import pytest

from integration_local.emulator import fill_placeholders
from .harness import ROOT, free_port, skip_tier_if_func_missing
from paste_table import paste_table
from servers import DataKitReceiver, FaultProxy

skip_tier_if_func_missing()

REGION = 'cn-northwest-1'
FAILURE_WALL_LIMIT = 30          # seconds: a failing account must say so quickly
MFA_CODE_KEY = '<MFA TOTP>'


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------

def startup_code(filename, values, edit=None):
    """scripts/<filename> with the placeholders filled; `edit(text)` may change it."""
    with open(os.path.join(ROOT, 'scripts', filename), encoding='utf-8') as f:
        text = fill_placeholders(f.read(), values)
    return edit(text) if edit else text


def without_role(text):
    """The MFA script without a role, as scripts/README.md tells users to do."""
    return ''.join(line for line in text.splitlines(True)
                   if '"assume_role_arn"' not in line and '"role_session_name"' not in line)


def with_timeout(seconds):
    def edit(text):
        assert 'timeout=3600' in text
        return text.replace('timeout=3600', f'timeout={seconds}')
    return edit


def publish_startup(func, filename, values, edit=None, script_id=None):
    script_id = script_id or 'my_aws__' + re.sub(r'\W', '_', os.path.splitext(filename)[0])
    func.publish(script_id, startup_code(filename, values, edit))
    return f'{script_id}.run'


def point_worker_at(func, aws, **extra):
    """The worker's AWS environment: moto, and the test IMDS that seed_estate started."""
    func.set_process_env(AWS_ENDPOINT_URL=aws.url,
                         AWS_EC2_METADATA_SERVICE_ENDPOINT=os.environ['AWS_EC2_METADATA_SERVICE_ENDPOINT'],
                         **extra)


def account_id(values):
    return values['user']['arn'].split(':')[4]


def region_instance_ids(aws, region=REGION):
    ec2 = aws.client('ec2', region)
    ids = []
    for page in ec2.get_paginator('describe_instances').paginate():
        ids += [i['InstanceId'] for r in page['Reservations'] for i in r['Instances']]
    return ids


def assert_success(r):
    assert r.status == 'success', f'the task did not succeed:\n{r}'
    assert r.blocked_hosts == [], f'the worker tried hosts beyond loopback: {r.blocked_hosts}'
    assert r.threads_alive == [], f'threads still alive {r.thread_grace} s after the task: {r.threads_alive}'


def line_matching(lines, *patterns):
    """The first line matching every pattern (case-insensitive), else None."""
    for line in lines:
        if all(re.search(p, line, re.I) for p in patterns):
            return line
    return None


def assert_run_log(r, account, instances):
    """The lines a user reads in Func's task log after a good run."""
    log = r.messages
    shown = '\n'.join(r.print_log)
    assert line_matching(log, r'datakit', r'connector'), f'no DataKit connector line in the task log:\n{shown}'
    assert line_matching(log, re.escape(account)), f'no identity line with account {account}:\n{shown}'
    assert line_matching(log, re.escape(REGION), rf'\b{instances} instance'), \
        f'no result line for {REGION} with {instances} instance(s):\n{shown}'
    assert line_matching(log, rf'\b{instances} point', r'\b(done|total|written)'), \
        f'no totals line with {instances} point(s):\n{shown}'


def assert_one_clear_failure(r, *patterns):
    """Ended 'failure' quickly, with one line a user can act on."""
    assert r.status == 'failure', f'expected a failure:\n{r}'
    assert r.wall < FAILURE_WALL_LIMIT, f'the failure took {r.wall} s:\n{r}'
    exception = (r.exception or '').strip()
    assert exception and '\n' not in exception, f'the exception is not one line: {exception!r}'
    for pattern in patterns:
        assert re.search(pattern, exception, re.I), f'{pattern!r} not in the exception line: {exception!r}'
    assert line_matching(r.messages, *patterns), \
        f'no task log line says {patterns}:\n' + '\n'.join(r.print_log)
    assert 'Traceback (most recent call last)' not in '\n'.join(r.print_log), r
    assert r.blocked_hosts == [] and r.threads_alive == [], r


def lp_tags(line):
    """{tag: value} of one line-protocol line (unescaped)."""
    series = re.split(r'(?<!\\) ', line, maxsplit=1)[0]
    parts = re.split(r'(?<!\\),', series)
    unescape = lambda s: re.sub(r'\\(.)', r'\1', s)  # noqa: E731
    tags = {}
    for part in parts[1:]:
        key, _, value = part.partition('=')
        tags[unescape(key)] = unescape(value)
    return unescape(parts[0]), tags


def stays(read, seconds):
    """Poll `read()` for `seconds`; return the first value that differs from
    the initial one (None when it never changed)."""
    initial = read()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if read() != initial:
            return read()
        time.sleep(0.1)
    return None


class SlowServer:
    """Answers nothing for `seconds` (or until stopped): an AWS endpoint that hangs."""

    def __init__(self, seconds=120):
        self.count = 0
        self.lock = threading.Lock()
        self.release = threading.Event()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = 'HTTP/1.1'

            def log_message(self, *args):
                pass

            def _slow(self):
                self.rfile.read(int(self.headers.get('Content-Length') or 0))
                with outer.lock:
                    outer.count += 1
                outer.release.wait(seconds)
                body = b'<Response><Errors><Error><Code>ServiceUnavailable</Code></Error></Errors></Response>'
                try:
                    self.send_response(503)
                    self.send_header('Content-Length', str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except OSError:         # the client gave up long ago
                    self.close_connection = True

            do_GET = do_POST = _slow

        self.httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f'http://127.0.0.1:{self.httpd.server_address[1]}'
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def requests(self):
        with self.lock:
            return self.count

    def stop(self):
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


class RecordingProxy(FaultProxy):
    """A pass-through proxy in front of moto that keeps every response body
    (STS answers carry the temporary secret keys and session tokens)."""

    def __init__(self, upstream):
        self.bodies = []
        super().__init__(upstream)

    def _forward(self, method, path, headers, body):
        status, response_headers, data = super()._forward(method, path, headers, body)
        with self.lock:
            self.bodies.append(data.decode('utf-8', 'replace'))
        return status, response_headers, data

    def secrets(self):
        with self.lock:
            text = '\n'.join(self.bodies)
        return set(re.findall(r'<(?:SecretAccessKey|SessionToken)>([^<]+)</', text))


def imds_secrets():
    """The instance role's temporary secret and token, as the test IMDS serves them."""
    base = os.environ['AWS_EC2_METADATA_SERVICE_ENDPOINT']
    token = urllib.request.urlopen(urllib.request.Request(
        base + '/latest/api/token', method='PUT',
        headers={'X-aws-ec2-metadata-token-ttl-seconds': '60'}), timeout=5).read().decode()
    path = base + '/latest/meta-data/iam/security-credentials/'
    read = lambda url: urllib.request.urlopen(urllib.request.Request(  # noqa: E731
        url, headers={'X-aws-ec2-metadata-token': token}), timeout=5).read().decode()
    creds = json.loads(read(path + read(path).strip()))
    return {creds['SecretAccessKey'], creds['Token']}


@pytest.fixture
def datakit(func):
    receiver = DataKitReceiver()
    func.set_datakit(receiver.url)
    yield receiver
    receiver.stop()


# --------------------------------------------------------------------------
# publishing: what users do first
# --------------------------------------------------------------------------

PASTE_TABLE = list(paste_table().items())


@pytest.mark.parametrize('filename,script_id', PASTE_TABLE, ids=[s for _, s in PASTE_TABLE])
def test_each_module_publishes_in_paste_order(func, filename, script_id):
    """A user pastes the modules one by one, in the README's order, and
    publishes each: Func's pre-check runs the module body."""
    position = [s for _, s in PASTE_TABLE].index(script_id)
    for earlier_file, earlier_id in PASTE_TABLE[:position]:
        with open(os.path.join(ROOT, earlier_file), encoding='utf-8') as f:
            func.publish(earlier_id, f.read(), check=False)
    with open(os.path.join(ROOT, filename), encoding='utf-8') as f:
        outcome = func.publish(script_id, f.read(), check=False)
    assert outcome.status == 'success', \
        f'{filename} does not publish as {script_id}: {outcome.exception}\n{outcome.traceback}'
    assert outcome.blocked_hosts == [] and outcome.threads_alive == [], outcome


# --------------------------------------------------------------------------
# the four startup scripts
# --------------------------------------------------------------------------

SEED_SCRIPTS = ['1_iam_user.py', '2_assume_role.py', '3_mfa.py', '4_instance_role.py']


@pytest.mark.parametrize('filename', SEED_SCRIPTS)
def test_seed_script_publishes_and_runs(modules, seed_estate, aws, datakit, filename):
    point_worker_at(modules, aws)
    func_id = publish_startup(modules, filename, seed_estate)
    expected = region_instance_ids(aws)

    r = modules.run(func_id)

    assert_success(r)
    assert_run_log(r, account_id(seed_estate), len(expected))
    assert sorted(datakit.names()) == sorted(expected)


def test_datakit_gets_one_aws_ec2_custom_object_per_instance(modules, seed_estate, aws, datakit):
    point_worker_at(modules, aws)
    func_id = publish_startup(modules, '1_iam_user.py', seed_estate)
    expected = region_instance_ids(aws)

    assert_success(modules.run(func_id))

    assert {path for path, *_ in datakit.requests} == {'/v1/write/custom_object'}
    points = [lp_tags(line) for line in datakit.lines]
    assert sorted(tags.get('name') for _, tags in points) == sorted(expected)     # once each
    for measurement, tags in points:
        assert measurement == 'aws_ec2'
        assert tags['InstanceId'] == tags['name']
        assert tags['RegionId'] == REGION and tags['cloud_provider'] == 'AWS'
        if tags['name'] in seed_estate['ids']:
            assert tags['InstanceName'].startswith('seed-')


# --------------------------------------------------------------------------
# state between tasks: Func's Redis
# --------------------------------------------------------------------------

SESSIONS = {
    'role': ('2_assume_role.py', None),
    'mfa+role': ('3_mfa.py', None),
    'mfa': ('3_mfa.py', without_role),
}
# moto's GetSessionToken answers fixed credentials that its own IAM enforcement
# then refuses (aws-facts.md): with MFA and no role, both tasks fail at their
# first call with the session, and what stays testable is that the second task
# reused the first task's session instead of sending the code again.
MOTO_FIXED_SESSION = {'mfa'}


@pytest.mark.parametrize('method', list(SESSIONS))
def test_sessions_are_kept_in_func_redis_between_tasks(modules, seed_estate, aws, datakit, method):
    """AssumeRole / GetSessionToken once across two tasks, even when the
    second task runs in another worker process (as Func's pool does)."""
    filename, edit = SESSIONS[method]
    point_worker_at(modules, aws)
    modules.set_env('INTEGRATION_FORCE', '1')        # the second task must collect too
    func_id = publish_startup(modules, filename, seed_estate, edit,
                              script_id=f'my_aws__session_{method.replace("+", "_")}')

    with aws.recording() as first:
        r1 = modules.run(func_id)
    modules.restart_worker()
    point_worker_at(modules, aws)
    with aws.recording() as second:
        r2 = modules.run(func_id)

    starts = lambda calls: [c for c in calls if c['service'] == 'sts'  # noqa: E731
                            and c['action'] in ('AssumeRole', 'GetSessionToken')]
    assert len(starts(first)) == 1, [c['action'] for c in first]
    assert starts(second) == [], f'the second task started a new session: {starts(second)}'
    code_sent = [c for c in first + second if c['params'].get('TokenCode') == seed_estate[MFA_CODE_KEY]]
    assert len(code_sent) == (0 if method == 'role' else 1)
    if method in MOTO_FIXED_SESSION:
        for r in (r1, r2):
            assert r.status == 'failure' and 'InvalidClientTokenId' in r.exception, r
        used = lambda calls: {c['token'] for c in calls if c['token']}  # noqa: E731
        assert used(second) and used(second) == used(first), 'the second task did not reuse the session'
        return
    assert_success(r1)
    assert_success(r2)
    # The second task collected with the first task's temporary credentials.
    ec2_first = [c for c in first if c['service'] == 'ec2' and c['action'] == 'DescribeInstances']
    ec2_second = [c for c in second if c['service'] == 'ec2' and c['action'] == 'DescribeInstances']
    assert ec2_first and ec2_second
    assert {c['token'] for c in ec2_second} == {c['token'] for c in ec2_first} != {None}


def test_fresh_collection_is_skipped_across_tasks_unless_forced(modules, seed_estate, aws, datakit):
    point_worker_at(modules, aws)
    func_id = publish_startup(modules, '1_iam_user.py', seed_estate)
    expected = region_instance_ids(aws)

    with aws.recording() as first:
        r1 = modules.run(func_id)
    assert_success(r1)
    assert [c for c in first if c['service'] == 'ec2']
    assert len(datakit.lines) == len(expected)

    with aws.recording() as second:
        r2 = modules.run(func_id)
    assert_success(r2)
    assert line_matching(r2.messages, r'skipped'), 'no "skipped" line:\n' + '\n'.join(r2.print_log)
    assert [c for c in second if c['service'] == 'ec2'] == [], 'the skipped task called EC2'
    assert len(datakit.lines) == len(expected), 'the skipped task wrote points'

    modules.set_env('INTEGRATION_FORCE', '1')                  # a Func environment variable
    with aws.recording() as forced:
        r3 = modules.run(func_id)
    assert_success(r3)
    assert not line_matching(r3.messages, r'skipped'), '\n'.join(r3.print_log)
    assert [c for c in forced if c['service'] == 'ec2' and c['action'] == 'DescribeInstances']
    assert len(datakit.lines) == 2 * len(expected)


# --------------------------------------------------------------------------
# failures and timeouts
# --------------------------------------------------------------------------

def test_debug_runs_before_any_connector_exists(modules, seed_estate, aws):
    """debug=True writes nothing: a user tries the script before creating the
    DataKit connector; without debug, the missing connector is one line."""
    point_worker_at(modules, aws)

    def debug(text):
        return text.replace('Runner(main.DataCollector(account, collector_configs)).run()',
                            "Runner(main.DataCollector(account, collector_configs), debug=True, "
                            "datakit_id='not_created_yet').run()")
    r = modules.run(publish_startup(modules, '1_iam_user.py', seed_estate, debug, 'my_aws__debug'))

    assert_success(r)
    assert line_matching(r.messages, r"no DataKit connector 'not_created_yet'", r'debug=True'), r
    assert line_matching(r.messages, re.escape(REGION), r'instance'), r

    def missing(text):
        return text.replace('Runner(main.DataCollector(account, collector_configs)).run()',
                            "Runner(main.DataCollector(account, collector_configs), "
                            "datakit_id='not_created_yet').run()")
    r = modules.run(publish_startup(modules, '1_iam_user.py', seed_estate, missing, 'my_aws__missing'))

    assert_one_clear_failure(r, r"no DataKit connector with that id", r'not_created_yet',
                             r'create one')


@pytest.mark.parametrize('mistake, patterns', [
    ('"member_accounts": [111122223333],', (r"account\['member_accounts'\]\[0\]", r'in quotes')),
    ('"member_role": "reader",', (r"account\['member_role'\]", r'member_role_name')),
])
def test_a_mistake_in_the_account_dict_is_printed_in_the_task_log(modules, seed_estate, aws, mistake,
                                                                    patterns):
    """The collector is made in the startup script, before any Runner: its
    mistake is one line in the task log (which shows only print) as well as
    the task's exception, and no AWS call is made."""
    point_worker_at(modules, aws)

    def bad(text):
        return text.replace('"ak_secret"', mistake + '\n    "ak_secret"', 1)
    with aws.recording() as calls:
        r = modules.run(publish_startup(modules, '1_iam_user.py', seed_estate, bad, 'my_aws__mistake'))

    assert_one_clear_failure(r, *patterns)
    assert len([m for m in r.messages if re.search(patterns[0], m)]) == 1, r
    assert calls == []


def test_an_imds_that_never_answers_points_at_the_hop_limit(modules, datakit):
    """Func in a container on an instance that requires IMDSv2 with the
    default hop limit of 1: the token request times out, and the error says
    what to change (on Func's Python 3.8 a socket's timeout is not a
    TimeoutError)."""
    silent = socket.socket()
    silent.bind(('127.0.0.1', 0))
    silent.listen(16)           # accepts connections, never answers
    modules.set_process_env(AWS_ENDPOINT_URL=None, AWS_EC2_METADATA_V1_DISABLED='true',
                            AWS_EC2_METADATA_SERVICE_ENDPOINT=f'http://127.0.0.1:{silent.getsockname()[1]}')
    try:
        r = modules.run(publish_startup(modules, '4_instance_role.py', {}, with_timeout(60)))
    finally:
        modules.set_process_env(AWS_EC2_METADATA_V1_DISABLED=None)
        silent.close()

    assert_one_clear_failure(r, r'hop limit')


def test_revoked_keys_fail_fast_with_one_line(modules, seed_estate, aws, datakit):
    point_worker_at(modules, aws)
    func_id = publish_startup(modules, '1_iam_user.py', seed_estate)
    user = seed_estate['user']
    aws.client('iam', REGION).delete_access_key(UserName=user['arn'].split('/')[-1],
                                                AccessKeyId=user['ak_id'])

    r = modules.run(func_id)

    assert_one_clear_failure(r, r'(InvalidClientTokenId|revoked|not valid|invalid|security token)')
    assert datakit.lines == []


def test_wrong_external_id_fails_fast_with_one_line(modules, seed_estate, aws, datakit):
    point_worker_at(modules, aws)
    values = dict(seed_estate, **{'<AWS EXTERNAL ID>': 'not-the-external-id'})
    func_id = publish_startup(modules, '2_assume_role.py', values)

    r = modules.run(func_id)

    assert_one_clear_failure(r, r'(AccessDenied|ExternalId|not authorized|AssumeRole)')
    assert datakit.lines == []


def test_datakit_down_fails_fast_with_one_line(modules, seed_estate, aws):
    point_worker_at(modules, aws)
    modules.set_datakit(f'http://127.0.0.1:{free_port()}')     # nothing listens there
    func_id = publish_startup(modules, '1_iam_user.py', seed_estate)

    r = modules.run(func_id)

    assert_one_clear_failure(r, r'datakit')


@pytest.mark.parametrize('slow_part', ['ec2', 'datakit'])
def test_timeout_leaves_no_thread_and_no_request_behind(modules, seed_estate, aws, slow_part):
    """DFF.API(timeout=4). EC2 hangs: the run stops it before the limit
    (half of the time is kept to deliver) and ends failed by itself, one line
    saying so. DataKit hangs while the points are delivered: Func interrupts
    the task at its timeout. Either way, afterwards nothing of ours may still
    run or call the slow endpoint."""
    slow = SlowServer()
    receiver = DataKitReceiver(script=[('slow', 60)] * 5) if slow_part == 'datakit' else DataKitReceiver()
    try:
        if slow_part == 'ec2':
            point_worker_at(modules, aws, AWS_ENDPOINT_URL_EC2=slow.url)
            requests = slow.requests
        else:
            point_worker_at(modules, aws)
            requests = lambda: receiver.attempts  # noqa: E731
        modules.set_datakit(receiver.url)
        func_id = publish_startup(modules, '1_iam_user.py', seed_estate, with_timeout(4),
                                  script_id='my_aws__timeout')

        r = modules.run(func_id, thread_grace=5)

        if slow_part == 'ec2':
            assert r.status == 'failure' and r.exception == '#1 AWS EC2: 1 region(s) failed: cn-northwest-1', r
            assert line_matching(r.messages, r"cn-northwest-1 FAILED: unfinished [\d.]+ s before the task's "
                                 r'time limit'), '\n'.join(r.print_log)
            assert r.wall < 4, r
        else:
            assert r.status == 'timeout', f'expected a timeout:\n{r}'
            assert r.timeout == 4 and 4 <= r.wall < 15, r
        assert requests() >= 1, f'the slow {slow_part} endpoint was never reached:\n{r}'
        assert r.threads_alive == [], \
            f'threads of the task still alive {r.thread_grace} s after its timeout: {r.threads_alive}'
        changed = stays(requests, 3)
        assert changed is None, f'{slow_part} got more requests after the task ended: now {changed}'
        assert r.blocked_hosts == []
    finally:
        slow.stop()
        receiver.stop()


# --------------------------------------------------------------------------
# secrets
# --------------------------------------------------------------------------

RUNS_FOR_SECRETS = [       # (script, edit, tasks, expected status)
    ('1_iam_user.py', None, 1, 'success'),
    ('2_assume_role.py', None, 2, 'success'),        # the second task reads the cached session
    ('3_mfa.py', None, 2, 'success'),
    ('3_mfa.py', without_role, 2, 'failure'),       # moto's fixed GetSessionToken credentials
    ('4_instance_role.py', None, 1, 'success'),
]


def _run_every_method_through_a_recording_proxy(func, seed_estate, aws):
    """Every authentication method (the role and MFA ones twice), then a
    failing one, with AWS behind a recording proxy. Returns (task results,
    every secret that existed meanwhile)."""
    proxy = RecordingProxy(aws.url)
    try:
        point_worker_at(func, aws)
        func.set_process_env(AWS_ENDPOINT_URL=proxy.url)
        func.set_env('INTEGRATION_FORCE', '1')
        results = []
        with aws.recording() as calls:
            for filename, edit, times, expected in RUNS_FOR_SECRETS:
                func_id = publish_startup(func, filename, seed_estate, edit)
                for _ in range(times):
                    r = func.run(func_id)
                    assert r.status == expected, f'{filename}: expected {expected}:\n{r}'
                    results.append(r)
            bad = dict(seed_estate, **{'<AWS EXTERNAL ID>': 'not-the-external-id'})
            r = func.run(publish_startup(func, '2_assume_role.py', bad, script_id='my_aws__bad_external_id'))
            assert r.status == 'failure', r
            results.append(r)
        secrets = proxy.secrets() | imds_secrets()
        secrets |= {c['token'] for c in calls if c['token']}
        secrets |= {seed_estate['<AWS AK SECRET>'], seed_estate[MFA_CODE_KEY]}
        secrets = {s for s in secrets if len(s) >= 6}
        assert len(secrets) > 4, 'expected ak_secret, the MFA code, temporary keys and tokens'
        return results, secrets
    finally:
        proxy.stop()


def _found(secrets, text):
    return sorted(s[:4] + '...' for s in secrets if s in text)


def test_no_secret_in_task_log_exception_or_traceback(modules, seed_estate, aws, datakit):
    results, secrets = _run_every_method_through_a_recording_proxy(modules, seed_estate, aws)
    leaks = []
    for number, r in enumerate(results, 1):
        for where, text in [('print log', '\n'.join(r.print_log)), ('exception', r.exception or ''),
                            ('traceback', r.traceback or '')]:
            if _found(secrets, text):
                leaks.append(f'task {number}: {where}: {_found(secrets, text)}')
    assert not leaks, 'secrets a user can read in the task record:\n' + '\n'.join(leaks)


def test_no_secret_in_dff_cache(modules, seed_estate, aws, datakit):
    """DFF.CACHE is Func's shared Redis: every script of the instance can read
    any scope, and when a task fails Func's worker log replays the task's Redis
    commands (values cut at 100 characters) on the container's stdout."""
    results, secrets = _run_every_method_through_a_recording_proxy(modules, seed_estate, aws)
    cache = modules.cache()
    assert cache, 'nothing in DFF.CACHE after the role and MFA tasks'
    leaks = [f'DFF.CACHE {scope} {key}: {_found(secrets, json.dumps(value))}'
             for scope, keys in cache.items() for key, value in keys.items()
             if _found(secrets, json.dumps(value))]
    leaks += [f'worker stdout of task {number}: {_found(secrets, r.worker_stdout)}'
              for number, r in enumerate(results, 1) if _found(secrets, r.worker_stdout)]
    assert not leaks, ('secrets in DFF.CACHE values (Func\'s Redis, readable by every script) '
                       'or in the worker\'s stdout:\n' + '\n'.join(leaks))


# --------------------------------------------------------------------------
# EC2 with its CloudWatch metrics (scripts/5_ec2_with_metrics.py)
# --------------------------------------------------------------------------

def every_minute(delay):
    """Period 60, the window ending `delay` seconds before now: two tasks a
    few seconds apart can then read different buckets."""
    def edit(text):
        old = "    'targets': [{'namespace': 'AWS/EC2', 'metrics': 'ALL'}],\n"
        assert old in text
        return text.replace(old, old + f"    'period': 60, 'delay': {delay},\n")
    return edit


def metric_points(lines):
    return [(lp_tags(line)[1], line) for line in lines if line.startswith('aws_AWS/EC2,')]


def test_combined_script_links_metrics_to_objects_across_two_tasks(modules, seed_estate, aws, datakit):
    from integration_local.emulator import put_demo_metrics
    put_demo_metrics(aws, REGION, seed_estate['ids'])         # an hour, a datapoint a minute
    point_worker_at(modules, aws)
    script_id = 'my_aws__ec2_with_metrics'
    publish_startup(modules, '5_ec2_with_metrics.py', seed_estate, every_minute(300), script_id=script_id)

    first = modules.run(f'{script_id}.run')

    assert_success(first)
    seen = len(datakit.lines)
    objects = [lp_tags(line)[1] for line in datakit.lines if line.startswith('aws_ec2,')]
    names = {tags['name']: tags['InstanceName'] for tags in objects if tags['name'] in seed_estate['ids']}
    assert set(names) == set(seed_estate['ids'])
    linked = [tags for tags, _ in metric_points(datakit.lines) if tags['InstanceId'] in names]
    assert linked and all(tags['InstanceName'] == names[tags['InstanceId']] for tags in linked)
    assert all('name' not in tags for tags in linked)
    assert line_matching(first.messages, r'AWS CloudWatch', re.escape(REGION), r'series')

    # Minutes later in the user's world: EC2 is fresh and skips; the metrics
    # still take the instances' tags, from the map the first task kept.
    publish_startup(modules, '5_ec2_with_metrics.py', seed_estate, every_minute(120), script_id=script_id)
    second = modules.run(f'{script_id}.run')

    assert_success(second)
    assert line_matching(second.messages, r'AWS EC2', r'skipped')
    later = datakit.lines[seen:]
    assert not [line for line in later if line.startswith('aws_ec2,')]
    linked_later = [tags for tags, _ in metric_points(later) if tags['InstanceId'] in names]
    assert linked_later and all(tags['InstanceName'] == names[tags['InstanceId']] for tags in linked_later)


# --------------------------------------------------------------------------
# Every account of an AWS Organization (tests/org_estate.py)
# --------------------------------------------------------------------------

ORG_SCRIPT = '''
account = {{
    "ak_id"             : "{ak_id}",
    "ak_secret"         : "{ak_secret}",
    "member_role_name"  : "{role}",
    "member_external_id": "{external_id}",
}}
collector_configs = {{'regions': {regions!r}}}

from integration_core__runner import Runner
import integration_aws_ec2__main as main

@DFF.API('AWS-EC2 Collection', timeout=300, fixed_crontab='*/15 * * * *')
def run():
    Runner(main.DataCollector(account, collector_configs)).run()
'''


def test_an_organization_in_one_task_then_without_sts(modules, org, aws, datakit):
    from org_estate import EXTERNAL_ID, REGIONS, ROLE
    modules.set_process_env(AWS_ENDPOINT_URL=org['proxy'].url)
    modules.set_env('INTEGRATION_FORCE', 'true')
    code = ORG_SCRIPT.format(ak_id=org['user']['ak_id'], ak_secret=org['user']['ak_secret'],
                             role=ROLE, external_id=EXTERNAL_ID, regions=REGIONS)
    modules.publish('my_aws__organization', code)

    first = modules.run('my_aws__organization.run')

    members = org['members']
    broken = members['without-role']
    assert first.status == 'failure' and first.wall < FAILURE_WALL_LIMIT, first
    assert re.search(rf"1 account\(s\) failed: {broken['id']}", first.exception or ''), first.exception
    failed_lines = [m for m in first.messages if 'FAILED' in m]
    assert len(failed_lines) == 1 and broken['id'] in failed_lines[0]
    for label in ('with-instances', 'external-id'):
        member = members[label]
        assert line_matching(first.messages, rf"account {member['id']} \({re.escape(member['name'])}\) as "
                             rf'arn:aws:sts::{member["id"]}:assumed-role/{ROLE}/'), '\n'.join(first.print_log)
    points = [lp_tags(line)[1] for line in datakit.lines]
    wanted = members['with-instances']
    assert sorted(t['name'] for t in points if t.get('AccountId') == wanted['id']) == sorted(
        wanted['instances']['us-east-1'] + wanted['instances']['us-west-2'])
    assert {t.get('AccountName') for t in points if t.get('AccountId') == wanted['id']} == {wanted['name']}
    assert first.threads_alive == [] and first.blocked_hosts == []

    modules.publish('test__kept_sessions', KEPT_CODE.format(store='kept_sessions.v1'))
    sessions = modules.run('test__kept_sessions.run').result
    assert len(sessions) == 3, 'the first task kept the sessions of its three members'
    with aws.recording() as calls:
        second = modules.run('my_aws__organization.run')
    assert second.status == 'failure'            # the broken account, again, one line
    assert [c['action'] for c in calls if c['service'] == 'sts'] == [], \
        'the sessions of the members are kept in Func\'s Redis: no STS call'
    assert modules.run('test__kept_sessions.run').result == sessions, \
        'the next task took the Session objects of the last, not new ones'


def test_an_account_closed_by_its_state_alone_is_skipped_in_func(modules, org, aws, datakit):
    """AWS retired an account's Status for State on 2026-09-09, which Func's
    botocore (1.37) does not know: its parser drops it. A closed account that
    only State says is closed is one "skipped" line, never an AssumeRole."""
    import json
    from org_estate import EXTERNAL_ID, REGIONS, ROLE
    members, proxy = org['members'], org['proxy']
    listed = [('123456789012', 'management', 'ACTIVE'), (members['with-instances']['id'], 'ok', 'ACTIVE'),
              ('999988887772', 'closed-last-week', 'CLOSED')]
    answer = json.dumps({'Accounts': [
        {'Id': i, 'Name': n, 'State': state, 'Email': f'{i}@example.com',
         'Arn': f'arn:aws:organizations::123456789012:account/o-example/{i}'} for i, n, state in listed]})
    judge = proxy.rule
    proxy.rule = lambda request: ('status', 200, answer) if request['action'] == 'ListAccounts' \
        else judge(request)
    modules.set_process_env(AWS_ENDPOINT_URL=proxy.url)
    modules.set_env('INTEGRATION_FORCE', 'true')
    modules.publish('my_aws__org_state', ORG_SCRIPT.format(
        ak_id=org['user']['ak_id'], ak_secret=org['user']['ak_secret'], role=ROLE,
        external_id=EXTERNAL_ID, regions=REGIONS))
    try:
        r = modules.run('my_aws__org_state.run')
    finally:
        proxy.rule = judge

    assert_success(r)
    assert line_matching(r.messages, r'account 999988887772 \(closed-last-week\) skipped: the account is CLOSED')
    # (The proxy's own view: an AssumeRole it refuses never reaches moto's recorder.)
    assert not [seen for seen in proxy.seen if seen['action'] == 'AssumeRole' and b'999988887772' in seen['body']]


@pytest.mark.parametrize('hanging', ['AssumeRole', 'DescribeInstances'])
def test_an_organization_whose_member_hangs_delivers_the_others_before_the_timeout(
        modules, org, aws, datakit, hanging):
    """DFF.API(timeout=8): one member's role (or its every EC2 call) hangs.
    The task ends before Func's timeout: that account is one line, every
    other account is delivered, and the task fails naming it."""
    from org_estate import EXTERNAL_ID, REGIONS, ROLE
    proxy, members = org['proxy'], org['members']
    hung, healthy = members['with-instances'], members['external-id']
    judge = proxy.rule

    def rule(request):
        if hanging == 'AssumeRole' and request['action'] == 'AssumeRole' and \
                f":{hung['id']}:" in urllib.parse.unquote(request['body'].decode()):
            return ('delay', 120)
        if hanging == 'DescribeInstances' and request['action'] == 'DescribeInstances' and \
                f":{hung['id']}:" in proxy.issued.get(request['access_key'], ''):
            return ('delay', 120)
        return judge(request)
    proxy.rule = rule
    modules.set_process_env(AWS_ENDPOINT_URL=proxy.url)
    modules.set_env('INTEGRATION_FORCE', 'true')
    code = ORG_SCRIPT.format(ak_id=org['user']['ak_id'], ak_secret=org['user']['ak_secret'],
                             role=ROLE, external_id=EXTERNAL_ID, regions=REGIONS)
    code = code.replace('timeout=300', 'timeout=8').replace(
        '"member_external_id"', f'"exclude_accounts": ["{members["without-role"]["id"]}"],\n    "member_external_id"')
    modules.publish('my_aws__organization_hangs', code)
    try:
        r = modules.run('my_aws__organization_hangs.run')
    finally:
        proxy.rule = judge

    assert r.status == 'failure' and r.wall < 8, r
    assert re.search(rf"1 account\(s\) failed: {hung['id']}", r.exception or ''), r.exception
    failed = [m for m in r.messages if 'FAILED' in m]
    assert len(failed) == 1 and hung['id'] in failed[0] and \
        "before the task's time limit" in failed[0], '\n'.join(r.print_log)
    points = [lp_tags(line)[1] for line in datakit.lines]
    assert sorted(t['name'] for t in points if t.get('AccountId') == healthy['id']) == \
        sorted(healthy['instances']['us-east-1'])
    assert not [t for t in points if t.get('AccountId') == hung['id']]
    assert r.threads_alive == [] and r.blocked_hosts == []


def test_our_xml_parser_reads_as_funcs_botocore_does(func_worker):
    """Under Func's Python and botocore (not the test venv's): our sessions'
    XML parser and botocore's own give the same dicts, key order included, for
    generated answers of every EC2 Describe, STS, IAM and CloudWatch query
    operation (tests/xml_responses.py)."""
    import subprocess
    done = subprocess.run([func_worker.python, os.path.join(ROOT, 'tests', 'xml_responses.py')],
                          capture_output=True, text=True, timeout=300,
                          env={'PATH': os.environ.get('PATH', ''), 'PYTHONDONTWRITEBYTECODE': '1'})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith('botocore 1.37.'), done.stdout
    counts = json.loads(done.stdout.split('parsed alike: ', 1)[1].replace("'", '"'))
    assert counts['ec2'] > 300 and min(counts.values()) > 10, counts


KEPT_CODE = '''import sys


@DFF.API('kept clients or sessions')
def run():
    shared = sys.modules.get('_integration_aws_shared')
    kept = shared.data.get('{store}', {{}}) if shared is not None else {{}}
    return sorted(id(value) for _, value in kept.values())
'''


def test_the_next_task_takes_the_clients_of_the_last(modules, seed_estate, aws, datakit):
    """Func runs the module bodies again in every task: the clients one task
    kept are still the next task's (the same code), not made anew."""
    point_worker_at(modules, aws)
    func_id = publish_startup(modules, '1_iam_user.py', seed_estate)
    modules.publish('test__kept_clients', KEPT_CODE.format(store='kept_clients.v1'))
    modules.set_env('INTEGRATION_FORCE', '1')
    assert_success(modules.run(func_id))
    first = modules.run('test__kept_clients.run').result
    assert first, 'the first task kept no client'
    assert_success(modules.run(func_id))
    assert modules.run('test__kept_clients.run').result == first
