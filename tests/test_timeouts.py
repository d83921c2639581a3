"""No hang, ever: a run past its timeout, or whose account fails, ends within
seconds, releases its lock, restores the GC threshold, and leaves no thread
calling AWS. Endpoints that hang are tests/blackhole.py, on loopback."""
import gc
import os
import subprocess
import sys
import time

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
def test_a_run_whose_endpoint_hangs_ends_at_its_timeout(seed_estate, write_script, receiver,
                                                        blackhole, hanging):
    """During collection (EC2) or during the identity call (STS): the process
    ends about when its 3 s timeout says, not when the requests in flight end."""
    text = open(os.path.join(ROOT, 'scripts', '1_iam_user.py')).read().replace('timeout=3600', 'timeout=3')
    path = write_script(text, seed_estate)
    result, seconds = run_script(path, {'DATAKIT_URL': receiver.url, 'INTEGRATION_FORCE': '1',
                                        f'AWS_ENDPOINT_URL_{hanging}': blackhole.url})
    assert result.returncode == 1, result.stdout + result.stderr
    assert 'AWS-EC2 Collection: stopped after its timeout of 3 s' in result.stdout
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
        api = {'title': 'org', 'name': 'run', 'timeout': 2,
               'func': lambda: core.Runner(collector, force=True).run()}
        started = time.monotonic()
        assert local_cli.run_api(api) == local_cli.EXIT_FAILED
        assert time.monotonic() - started < 2 + 1.5
        assert our_threads_left(core.STOP_GRACE + 1) == []
        seen = lambda: len(blackhole.requests) + len([r for r in slow.seen if r['action'] == 'AssumeRole'])  # noqa: E731
        calls = seen()
        assert calls >= 1
        time.sleep(2)
        assert seen() == calls, 'a thread went on calling STS'
    finally:
        slow.stop()
