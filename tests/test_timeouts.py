"""No hang, ever: a run past its timeout, or whose account fails, ends within
seconds, releases its lock, restores the GC threshold, and leaves no thread
calling AWS. Endpoints that hang are tests/blackhole.py, on loopback."""
import gc
import os
import re
import subprocess
import sys
import time
import urllib.parse

import pytest

import integration_core__runner as core
import integration_aws_ec2__main as ec2
import integration_local.cli as local_cli
import integration_local.runtime as local_runtime
from blackhole import Blackhole
from conftest import ROOT, our_threads_left
from servers import DataKitReceiver


@pytest.fixture
def blackhole():
    server = Blackhole()
    yield server
    server.stop()


@pytest.fixture
def receiver():
    server = DataKitReceiver()
    yield server
    server.stop()


def run_script(path, env, timeout=60):
    started = time.monotonic()
    result = subprocess.run([sys.executable, '-m', 'integration_core__runner', 'run', path],
                            capture_output=True, text=True, cwd=ROOT, timeout=timeout,
                            env={**os.environ, **env})
    return result, time.monotonic() - started


@pytest.mark.parametrize('hanging', ['EC2', 'STS'])
def test_a_run_whose_endpoint_hangs_ends_before_its_timeout(seed_estate, write_script, receiver,
                                                            blackhole, hanging):
    """During collection (EC2) or during the identity call (STS): the run
    stops what hangs before its 3 s timeout (half of the time left is kept
    to deliver), says so in one line, and ends failed by itself."""
    text = open(os.path.join(ROOT, 'scripts', '1_iam_user.py')).read().replace('timeout=3600', 'timeout=3')
    path = write_script(text, seed_estate)
    result, seconds = run_script(path, {'DATAKIT_URL': receiver.url, 'INTEGRATION_FORCE': '1',
                                        f'AWS_ENDPOINT_URL_{hanging}': blackhole.url})
    assert result.returncode == 1, result.stdout + result.stderr
    where = 'cn-northwest-1 FAILED:' if hanging == 'EC2' else 'FAILED: account:'
    cut = [line for line in result.stdout.splitlines() if 'FAILED' in line]
    assert len(cut) == 1 and re.search(
        rf"{where} unfinished 1\.\d+ s before the task's time limit, stopped so that what was "
        r'collected is delivered: raise DFF.API\(timeout=...\), or split the accounts', cut[0]), result.stdout
    assert 'stopped after its timeout' not in result.stdout
    assert seconds < 3 + 4, f'the run took {seconds:.1f} s for a 3 s timeout'
    assert blackhole.requests, 'the endpoint was never called: the test proves nothing'


def test_after_a_timeout_no_thread_goes_on_calling_aws(seed_estate, receiver, blackhole, monkeypatch):
    """In one process, as in a Func worker that goes on to its next task."""
    monkeypatch.setenv('AWS_ENDPOINT_URL_EC2', blackhole.url)
    local_runtime.install(local_runtime.LocalDFF(datakit_url=receiver.url))
    account = {'ak_id': seed_estate['<AWS AK ID>'], 'ak_secret': seed_estate['<AWS AK SECRET>']}
    collector = ec2.DataCollector(account, {'regions': ['cn-northwest-1', 'cn-north-1']})
    api = {'title': 'hangs', 'name': 'run', 'timeout': 2,
           'func': lambda: core.Runner(collector, force=True).run()}
    threshold = gc.get_threshold()
    started = time.monotonic()
    assert local_cli.run_api(api) == local_cli.EXIT_FAILED
    assert time.monotonic() - started < 2 + 1.5
    assert gc.get_threshold() == threshold
    assert our_threads_left(core.STOP_GRACE + 1) == []
    calls = len(blackhole.requests)
    assert calls >= 1
    time.sleep(3)
    assert len(blackhole.requests) == calls, 'a thread went on calling the endpoint'
    # The same collector, run again once EC2 answers: the last run's deadline
    # is not this one's.
    monkeypatch.delenv('AWS_ENDPOINT_URL_EC2')
    assert local_cli.run_api(dict(api, timeout=60)) == local_cli.EXIT_OK
    assert [r['error'] for r in collector.results] == [None, None]


def test_an_account_that_fails_while_regions_hang_ends_in_seconds(user, receiver, blackhole,
                                                                  monkeypatch, caplog):
    """Revoked keys: the identity call fails while every region's first page
    hangs; the run ends with one account line, its region threads stopped."""
    caplog.set_level('INFO', logger='integration')
    monkeypatch.setenv('AWS_ENDPOINT_URL_EC2', blackhole.url)
    local_runtime.install(local_runtime.LocalDFF(datakit_url=receiver.url))
    account = {'ak_id': user['ak_id'], 'ak_secret': 'x' * 40}      # a wrong secret
    collector = ec2.DataCollector(account, {'regions': ['us-east-1', 'us-west-2']})
    started = time.monotonic()
    with pytest.raises(core.RunFailed, match='account: '):
        core.Runner(collector, force=True).run()
    assert time.monotonic() - started < 10
    failed = [r for r in caplog.records if 'FAILED' in r.getMessage()]
    assert len(failed) == 1 and 'sts:GetCallerIdentity' in failed[0].getMessage()
    assert our_threads_left(core.STOP_GRACE + 1) == []



@pytest.mark.parametrize('hanging', ['every STS call', 'AssumeRole'])
@pytest.mark.parametrize('collector_module', ['ec2', 'cloudwatch'])
def test_a_timeout_while_member_roles_are_assumed_leaves_nothing_behind(aws, user, receiver, blackhole,
                                                                        monkeypatch, collector_module,
                                                                        hanging):
    """start() itself is cut short (the identity hangs, or the 20 member roles
    hang on a pool of 2): its pool and threads end with the run."""
    import integration_aws_cloudwatch__main as cw
    from servers import FaultProxy
    slow = FaultProxy(aws.url, lambda r: ('delay', 30) if r['action'] == 'AssumeRole' else None)
    try:
        if hanging == 'AssumeRole':
            monkeypatch.setenv('AWS_ENDPOINT_URL', slow.url)
        else:
            monkeypatch.setenv('AWS_ENDPOINT_URL_STS', blackhole.url)
        local_runtime.install(local_runtime.LocalDFF(datakit_url=receiver.url))
        account = {'ak_id': user['ak_id'], 'ak_secret': user['ak_secret'], 'member_role_name': 'reader',
                   'member_accounts': [f'{100000000000 + n}' for n in range(20)]}
        module = ec2 if collector_module == 'ec2' else cw
        collector = module.DataCollector(account, {'regions': ['us-east-1'], 'concurrency': 2})
        # 4 s: the run's deadline (half of it here) comes after the roles'
        # requests are in flight, even on a slow machine.
        api = {'title': 'org', 'name': 'run', 'timeout': 4,
               'func': lambda: core.Runner(collector, force=True).run()}
        started = time.monotonic()
        assert local_cli.run_api(api) == local_cli.EXIT_FAILED
        assert time.monotonic() - started < 4 + 1.5
        assert our_threads_left(core.STOP_GRACE + 1) == []
        seen = lambda: len(blackhole.requests) + len([r for r in slow.seen if r['action'] == 'AssumeRole'])  # noqa: E731
        calls = seen()
        assert calls >= 1
        time.sleep(2)
        assert seen() == calls, 'a thread went on calling STS'
    finally:
        slow.stop()


@pytest.mark.parametrize('hanging', ['AssumeRole', 'DescribeInstances', 'throttled'])
def test_a_member_account_that_hangs_costs_one_line_and_the_others_deliver(aws, org, sink, caplog,
                                                                            hanging):
    """An Organization run under its DFF.API timeout: one member's role (or
    its every EC2 call) hangs, or AWS throttles its every call (botocore
    sleeps between retries, which no cancelling wakes); another member has
    no role. Before the timeout the run stops the first (one line), says
    the second (one line), delivers and records the others, and ends failed
    by itself; the next run collects only the accounts that did not finish."""
    from org_estate import EXTERNAL_ID, REGIONS, ROLE
    from servers import ec2_error
    caplog.set_level('INFO', logger='integration')
    members, proxy = org['members'], org['proxy']
    hung, healthy, refused = members['external-id'], members['with-instances'], members['without-role']
    judge = proxy.rule

    def rule(request):
        params = dict(urllib.parse.parse_qsl(request['body'].decode()))
        mine = f":{hung['id']}:" in proxy.issued.get(request['access_key'], '')
        if hanging == 'AssumeRole' and request['action'] == 'AssumeRole' and \
                f":{hung['id']}:" in params.get('RoleArn', ''):
            return ('delay', 60)
        if hanging == 'DescribeInstances' and request['action'] == 'DescribeInstances' and mine:
            return ('delay', 60)
        if hanging == 'throttled' and request['action'] == 'DescribeInstances' and mine:
            return ('status', 503, ec2_error('RequestLimitExceeded', 'Request limit exceeded.'))
        return judge(request)
    proxy.rule = rule
    account = {'ak_id': org['user']['ak_id'], 'ak_secret': org['user']['ak_secret'],
               'member_role_name': ROLE, 'member_external_id': EXTERNAL_ID}

    def run(timeout):
        collector = ec2.DataCollector(account, {'regions': REGIONS})
        api = {'title': 'org', 'name': 'run', 'timeout': timeout,
               'func': lambda: core.Runner(collector).run()}
        started = time.monotonic()
        outcome = local_cli.run_api(api)
        return outcome, time.monotonic() - started

    outcome, seconds = run(10)
    assert outcome == local_cli.EXIT_FAILED and seconds < 10, seconds
    names = lambda account_id: sorted(p['tags']['name'] for _, p in sink.points  # noqa: E731
                                      if p['tags'].get('AccountId') == account_id)
    assert names(healthy['id']) == sorted(healthy['instances']['us-east-1'] + healthy['instances']['us-west-2'])
    assert names(hung['id']) == []
    lines = [r.getMessage() for r in caplog.records]
    failed = sorted(line for line in lines if 'FAILED' in line)
    assert len(failed) == 2, failed
    hung_line = next(line for line in failed if hung['id'] in line)
    assert re.search(rf"account {hung['id']} \({re.escape(hung['name'])}\) FAILED( in every region \(2\))?: "
                     r"unfinished \d+(\.\d+)? s before the task's time limit, stopped so that what was "
                     r'collected is delivered', hung_line), hung_line
    assert f"account {refused['id']} ({refused['name']}) FAILED: sts:AssumeRole: AccessDenied" in \
        next(line for line in failed if refused['id'] in line)
    assert not [line for line in lines if 'stopped after its timeout' in line]

    proxy.rule = judge
    caplog.clear()
    del sink.points[:]
    outcome, _ = run(30)
    assert outcome == local_cli.EXIT_FAILED         # the member without the role, again
    assert {p['tags']['AccountId'] for _, p in sink.points} == {hung['id']}
    assert names(hung['id']) == sorted(hung['instances']['us-east-1'])


def test_cloudwatch_stops_a_hanging_member_account_before_its_timeout(aws, org, sink, caplog):
    """The metrics collector under the same deadline: the member whose role
    hangs is one line, and the run ends failed by itself before its timeout."""
    import integration_aws_cloudwatch__main as cw
    from org_estate import EXTERNAL_ID, REGIONS, ROLE
    caplog.set_level('INFO', logger='integration')
    members, proxy = org['members'], org['proxy']
    hung = members['external-id']
    judge = proxy.rule
    proxy.rule = lambda request: ('delay', 60) if (
        request['action'] == 'AssumeRole' and f":{hung['id']}:" in
        dict(urllib.parse.parse_qsl(request['body'].decode())).get('RoleArn', '')) else judge(request)
    account = {'ak_id': org['user']['ak_id'], 'ak_secret': org['user']['ak_secret'],
               'member_role_name': ROLE, 'member_external_id': EXTERNAL_ID,
               'exclude_accounts': [members['without-role']['id']]}
    collector = cw.DataCollector(account, {'regions': REGIONS})
    api = {'title': 'org', 'name': 'run', 'timeout': 8, 'func': lambda: core.Runner(collector).run()}
    started = time.monotonic()
    assert local_cli.run_api(api) == local_cli.EXIT_FAILED
    assert time.monotonic() - started < 8
    failed = [r.getMessage() for r in caplog.records if 'FAILED' in r.getMessage()]
    assert len(failed) == 1 and f"account {hung['id']} ({hung['name']}) FAILED: unfinished " in failed[0] \
        and "before the task's time limit" in failed[0], failed
    assert our_threads_left(core.STOP_GRACE + 1) == []


@pytest.mark.parametrize('hanging', ['its role', 'its kept session\'s hourly check', "['*']'s partition"])
@pytest.mark.parametrize('collector_module', ['ec2', 'cloudwatch'])
def test_the_accounts_own_sts_call_that_hangs_ends_before_the_timeout(aws, org, sink, caplog, collector_module,
                                                                      hanging):
    """The session of the account itself: its role's AssumeRole, the hourly
    GetCallerIdentity of its kept session, or ['*']'s GetCallerIdentity that
    finds the partition, hangs. The run is stopped at its deadline like any
    other call: one line, and it ends failed by itself before the timeout."""
    import datetime
    import integration_aws_cloudwatch__main as cw
    from org_estate import EXTERNAL_ID, REGIONS, ROLE
    caplog.set_level('INFO', logger='integration')
    proxy = org['proxy']
    judge = proxy.rule
    now = [datetime.datetime.now(datetime.timezone.utc)]
    cache = core.MemoryCache(clock=lambda: now[0].timestamp())
    account = {'ak_id': org['user']['ak_id'], 'ak_secret': org['user']['ak_secret'],
               'member_role_name': ROLE, 'member_external_id': EXTERNAL_ID,
               'member_accounts': [org['members']['with-instances']['id']]}
    if hanging != "['*']'s partition":
        account['assume_role_arn'] = f'arn:aws:iam::123456789012:role/{ROLE}'
    module = ec2 if collector_module == 'ec2' else cw
    regions = ['*'] if hanging == "['*']'s partition" else REGIONS

    def run(timeout):
        collector = module.DataCollector(account, {'regions': regions}, cache=cache, clock=lambda: now[0])
        api = {'title': 'org', 'name': 'run', 'timeout': timeout,
               'func': lambda: core.Runner(collector, force=True).run()}
        started = time.monotonic()
        return local_cli.run_api(api), time.monotonic() - started
    if hanging == "its kept session's hourly check":
        run(30)                                     # the role's session, kept
        now[0] += datetime.timedelta(minutes=90)    # its last check an hour old
        caplog.clear()
    hub = account.get('assume_role_arn')

    def rule(request):
        params = dict(urllib.parse.parse_qsl(request['body'].decode()))
        if hanging == 'its role' and request['action'] == 'AssumeRole' and params.get('RoleArn') == hub:
            return ('delay', 60)
        if hanging != 'its role' and request['action'] == 'GetCallerIdentity':
            return ('delay', 60)
        return judge(request)
    proxy.rule = rule
    try:
        outcome, seconds = run(8)
    finally:
        proxy.rule = judge
    assert outcome == local_cli.EXIT_FAILED and seconds < 8, (outcome, seconds)
    failed = [r.getMessage() for r in caplog.records if 'FAILED' in r.getMessage()]
    assert len(failed) == 1 and re.search(r"FAILED: account: .*unfinished [\d.]+ s before the task's time "
                                          r'limit', failed[0]), failed
    assert not [r for r in caplog.records if 'stopped after its timeout' in r.getMessage()]
    assert our_threads_left(core.STOP_GRACE + 1) == []


@pytest.mark.parametrize('collector_module, failure', [('ec2', 'deadline'), ('cloudwatch', 'deadline'),
                                                       ('ec2', 'throttled')])
def test_a_listing_that_fails_part_way_collects_what_it_listed(aws, org, sink, caplog, monkeypatch,
                                                               collector_module, failure):
    """ListAccounts' second page hangs until the deadline, or is throttled
    past botocore's retries: the accounts of the first page are collected
    and delivered, the accounts not listed are one line, the run ends failed
    by itself before its timeout, and an excluded id on the page never read
    is no typo."""
    import json
    import integration_aws_cloudwatch__main as cw
    from org_estate import EXTERNAL_ID, REGIONS, ROLE
    caplog.set_level('INFO', logger='integration')
    monkeypatch.setenv('AWS_MAX_ATTEMPTS', '1')
    members, proxy = org['members'], org['proxy']
    judge, forward = proxy.rule, proxy._forward
    excluded = members['without-role']['id']
    throttled = json.dumps({'__type': 'TooManyRequestsException', 'Message': 'Rate exceeded'})

    def rule(request):
        if request['action'] == 'ListAccounts' and b'NextToken' in request['body']:
            return ('delay', 60) if failure == 'deadline' else ('status', 400, throttled)
        return judge(request)

    def paged(method, path, headers, body):         # a first page, without the excluded account
        status, response_headers, data = forward(method, path, headers, body)
        if headers.get('X-Amz-Target', '').endswith('ListAccounts') and b'NextToken' not in body:
            answer = json.loads(data)
            answer['Accounts'] = [a for a in answer['Accounts'] if a['Id'] != excluded]
            data = json.dumps(dict(answer, NextToken='page-2')).encode()
            response_headers = {k: v for k, v in response_headers.items() if k.lower() != 'content-length'}
        return status, response_headers, data
    proxy.rule, proxy._forward = rule, paged
    account = {'ak_id': org['user']['ak_id'], 'ak_secret': org['user']['ak_secret'],
               'member_role_name': ROLE, 'member_external_id': EXTERNAL_ID, 'exclude_accounts': [excluded]}
    module = ec2 if collector_module == 'ec2' else cw
    collector = module.DataCollector(account, {'regions': REGIONS})
    api = {'title': 'org', 'name': 'run', 'timeout': 8, 'func': lambda: core.Runner(collector, force=True).run()}
    started = time.monotonic()
    try:
        assert local_cli.run_api(api) == local_cli.EXIT_FAILED
    finally:
        proxy.rule, proxy._forward = judge, forward
    assert time.monotonic() - started < 8
    lines = [r.getMessage() for r in caplog.records]
    failed = [line for line in lines if 'FAILED' in line]
    why = (r"organizations:ListAccounts unfinished [\d.]+ s before the task's time limit" if failure == 'deadline'
           else 'organizations:ListAccounts: TooManyRequestsException')
    assert len(failed) == 1 and re.search(
        rf"account \(not listed\) FAILED: the Organization's accounts after the \d+ listed: {why}",
        failed[0]), failed
    assert not [line for line in lines if 'exclude_accounts' in line], lines
    if collector_module == 'ec2':
        healthy = members['with-instances']
        assert sorted(p['tags']['name'] for _, p in sink.points if p['tags'].get('AccountId') == healthy['id']) \
            == sorted(healthy['instances']['us-east-1'] + healthy['instances']['us-west-2'])


def test_a_collector_that_hangs_leaves_the_next_its_share_of_the_time(aws, org, sink, caplog):
    """EC2 and its CloudWatch metrics in one script (scripts/5): one member's
    EC2 calls hang. EC2 is stopped at its share of the time, and CloudWatch
    still runs for every account."""
    import integration_aws_cloudwatch__main as cw
    from org_estate import EXTERNAL_ID, REGIONS, ROLE
    caplog.set_level('INFO', logger='integration')
    members, proxy = org['members'], org['proxy']
    hung = members['external-id']
    judge = proxy.rule
    proxy.rule = lambda r: ('delay', 60) if (r['action'] == 'DescribeInstances' and f":{hung['id']}:" in
                                            proxy.issued.get(r['access_key'], '')) else judge(r)
    account = {'ak_id': org['user']['ak_id'], 'ak_secret': org['user']['ak_secret'],
               'member_role_name': ROLE, 'member_external_id': EXTERNAL_ID,
               'exclude_accounts': [members['without-role']['id']]}
    collectors = [ec2.DataCollector(account, {'regions': REGIONS}), cw.DataCollector(account, {'regions': REGIONS})]
    api = {'title': 'org', 'name': 'run', 'timeout': 12, 'func': lambda: core.Runner(collectors, force=True).run()}
    started = time.monotonic()
    try:
        assert local_cli.run_api(api) == local_cli.EXIT_FAILED
    finally:
        proxy.rule = judge
    assert time.monotonic() - started < 12
    lines = [r.getMessage() for r in caplog.records]
    failed = [line for line in lines if 'FAILED' in line]
    assert len(failed) == 1 and failed[0].startswith(f"[#1 AWS EC2] account {hung['id']} "), failed
    assert any(line.startswith(f"[#2 AWS CloudWatch] account {hung['id']} (") and ' as arn:' in line
               for line in lines), lines


def test_an_identity_call_throttled_past_the_deadline_is_one_line_before_the_timeout(aws, user, sink, caplog,
                                                                                   monkeypatch):
    """STS throttles GetCallerIdentity: botocore sleeps between its retries
    (up to 20 s each), which no cancelling wakes. At the deadline the run
    stops waiting for it: one line, and the run ends failed by itself."""
    import botocore.retries.standard as standard
    from servers import FaultProxy
    caplog.set_level('INFO', logger='integration')
    throttled = ('<ErrorResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/"><Error><Type>Sender</Type>'
                 '<Code>Throttling</Code><Message>Rate exceeded</Message></Error><RequestId>t</RequestId>'
                 '</ErrorResponse>')
    delay_amount = standard.ExponentialBackoff.delay_amount

    def long_delays(self, context):     # botocore's jitter drawn near its top: long sleeps
        self._random = lambda: 0.99
        return delay_amount(self, context)
    monkeypatch.setattr(standard.ExponentialBackoff, 'delay_amount', long_delays)
    proxy = FaultProxy(aws.url, lambda r: ('status', 400, throttled) if r['action'] == 'GetCallerIdentity'
                       else None)
    monkeypatch.setenv('AWS_ENDPOINT_URL', proxy.url)
    try:
        collector = ec2.DataCollector({'ak_id': user['ak_id'], 'ak_secret': user['ak_secret']},
                                      {'regions': ['us-east-1']})
        api = {'title': 'one', 'name': 'run', 'timeout': 13, 'func': lambda: core.Runner(collector, force=True).run()}
        started = time.monotonic()
        assert local_cli.run_api(api) == local_cli.EXIT_FAILED
        assert time.monotonic() - started < 13
    finally:
        proxy.stop()
    failed = [r.getMessage() for r in caplog.records if 'FAILED' in r.getMessage()]
    assert len(failed) == 1 and re.search(r"FAILED: account: unfinished [\d.]+ s before the task's time limit",
                                          failed[0]), failed
