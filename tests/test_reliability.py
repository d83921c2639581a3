import unicodedata
"""Hostile input, faults and secrets: nothing lost, nothing leaked, every
mistake answered in one clear line."""
import glob
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

import integration_core__runner as core
import integration_local.cli as local_cli
import integration_local.runtime as local_runtime
import integration_aws_auth as auth
import integration_aws_ec2__main as ec2
from conftest import ROOT, account_of, unique
from servers import DataKitReceiver, FaultProxy, ec2_error

CASES = os.path.join(ROOT, 'tests', 'cases', 'bad')
SENTINELS = ['SENTINELakSecret0000000000000000000000000', '975312', '9753124', '97531']
SCRIPT_TEMPLATE = '''account = {account!r}
collector_configs = {configs!r}

from integration_core__runner import Runner
import integration_aws_ec2__main as main

@DFF.API('AWS-EC2 Collection', timeout=3600, fixed_crontab='*/15 * * * *')
def run():
    Runner(main.DataCollector(account, collector_configs)).run()
'''


def load_cases():
    cases = []
    for path in sorted(glob.glob(os.path.join(CASES, '*'))):
        name = os.path.basename(path)
        if path.endswith('.py'):
            with open(path, encoding='utf-8') as f:
                first = f.readline()
            cases.append((name, {'script': path, 'expected': first.split('# expect: ', 1)[1].strip()}))
        else:
            with open(path, encoding='utf-8') as f:
                cases.append((name, json.load(f)))
    return cases


BAD_CASES = load_cases()


def test_the_corpus_is_large_and_covers_every_surface():
    assert len(BAD_CASES) >= 40
    prefixes = {name.split('_')[0] for name, _ in BAD_CASES}
    assert {'account', 'configs', 'hook', 'api', 'cli', 'script'} <= prefixes


def run_main(argv, capsys):
    try:
        status = local_cli.main(argv)
    except SystemExit as e:      # argparse's own exit
        status = e.code
    out = capsys.readouterr()
    return status, out.out, out.err


@pytest.mark.parametrize('name,case', BAD_CASES, ids=[n for n, _ in BAD_CASES])
def test_bad_input(aws, tmp_path, capsys, name, case):
    ok_script = tmp_path / 'ok.py'
    ok_script.write_text("@DFF.API('t', fixed_crontab='*/15 * * * *')\ndef run():\n    pass\n")
    nocron = tmp_path / 'nocron.py'
    nocron.write_text("@DFF.API('t')\ndef run():\n    pass\n")
    if 'argv' in case:
        argv = [a.format(script=ok_script, nocron=nocron) for a in case['argv']]
    else:
        script = case.get('script')
        if script is None:
            script = tmp_path / 'startup.py'
            script.write_text(SCRIPT_TEMPLATE.format(account=case['account'],
                                                     configs=case['collector_configs']))
        argv = ['run', str(script), '--datakit', 'http://127.0.0.1:9']
    with aws.recording() as calls:
        status, out, err = run_main(argv, capsys)
    assert status == 2, (out, err)
    errors = [line for line in err.splitlines() if line.strip()]
    assert len(errors) == 1, err
    assert case['expected'] in errors[0], errors[0]
    assert errors[0].startswith('error: ')
    assert 'Traceback' not in out + err
    # The sentinels, and this case's own secret and code however they are
    # spelt (with a space or line break inside, full-width digits).
    account = case.get('account')
    own = [account.get(key) for key in ('ak_secret', 'token_code')] if isinstance(account, dict) else []
    parts = [part for value in own if isinstance(value, str) for part in value.split() if len(part) >= 5]
    for secret in SENTINELS + parts + [form for part in parts for form in (
            ascii(part)[1:-1], unicodedata.normalize('NFKC', part), json.dumps(part)[1:-1])]:
        assert secret not in out + err, secret
    assert calls == [], 'no AWS call may be made for bad input'


def test_a_traceback_only_when_asked(tmp_path, capsys):
    path = os.path.join(CASES, 'hook_filter_not_callable.py')
    status, out, err = run_main(['run', path, '-vv'], capsys)
    assert status == 2 and 'Traceback' in err and 'filters[0] must be a function' in err
    assert SENTINELS[0] not in out + err


# -- faults between the collector and AWS ------------------------------------------

def every_nth(n, fault, service='ec2'):
    state = {'count': 0}

    def rule(request):
        if request['service'] != service:
            return None
        state['count'] += 1
        return fault if state['count'] % n == 1 else None
    return rule


@pytest.fixture
def receiver():
    server = DataKitReceiver()
    yield server
    server.stop()


def no_wait(seconds):
    pass


FAULTS = {
    'throttling 503': every_nth(2, ('status', 503, ec2_error('RequestLimitExceeded', 'Request limit exceeded.'))),
    '500s': every_nth(3, ('status', 500, ec2_error('InternalError', 'An internal error has occurred'))),
    'connection resets': every_nth(3, 'reset'),
    'truncated bodies': every_nth(3, 'truncate'),
    'added latency': lambda request: ('delay', 0.3) if request['service'] == 'ec2' else None,
}


@pytest.mark.parametrize('fault', list(FAULTS), ids=list(FAULTS))
def test_aws_faults_lose_no_instance(emulator, user, receiver, monkeypatch, fault):
    regions = ['us-east-2', 'eu-west-1']
    ids = {r: emulator.run_instances(r, 6, per_reservation=1) for r in regions}
    proxy = FaultProxy(emulator.url, FAULTS[fault])
    monkeypatch.setenv('AWS_ENDPOINT_URL', proxy.url)
    monkeypatch.setitem(core._RUNTIME, 'dff', local_runtime.LocalDFF(datakit_url=receiver.url, sleep=no_wait))
    collector = ec2.DataCollector(account_of(user), {'regions': regions, 'page_size': 5})
    try:
        try:
            summary = core.Runner(collector, force=True).run()
        except core.RunFailed as e:
            summary = e.summary
    finally:
        proxy.stop()
    delivered = set(receiver.names())
    for result in summary['collectors'][0]['regions']:
        if result['error'] is None:
            assert set(ids[result['region']]) <= delivered, f'{fault}: {result}'
        else:      # acceptable only when it says which region and why
            assert result['region'] in regions and result['error']
    assert summary['ok'], f'{fault}: retryable faults must be absorbed: {summary["collectors"]}'
    assert proxy.faults, 'the fault was injected'


def test_revoked_keys_give_one_line_per_account(aws, receiver, monkeypatch, caplog):
    user = aws.make_user(unique('revoked'))
    aws.client('iam', 'us-east-1').delete_access_key(UserName=user['arn'].split('/')[-1],
                                                     AccessKeyId=user['ak_id'])
    monkeypatch.setitem(core._RUNTIME, 'dff', local_runtime.LocalDFF(datakit_url=receiver.url, sleep=no_wait))
    caplog.set_level('INFO', logger='integration')
    collector = ec2.DataCollector(account_of(user), {'regions': ['us-east-1', 'us-west-2', 'eu-west-1']})
    with pytest.raises(core.RunFailed) as info:
        core.Runner(collector).run()
    errors = [r.getMessage() for r in caplog.records if r.levelname == 'ERROR'
              and r.name.startswith('integration.core') and '[#1' in r.getMessage()]
    assert len(errors) == 1 and 'account: AuthError: sts:GetCallerIdentity: InvalidClientTokenId' in errors[0]
    assert 'region' not in str(info.value)
    assert user['ak_secret'] not in caplog.text


# -- faults between the runner and DataKit -------------------------------------

DATAKIT_FAULTS = {
    'datakit 500s': every_nth(2, ('status', 500, '{"error_code":"internal"}'), service=None),
    'datakit 429': every_nth(2, ('status', 429, '{"error_code":"rate"}'), service=None),
    'datakit resets': every_nth(2, 'reset', service=None),
    'slow datakit': lambda request: ('delay', 0.5),
}


@pytest.mark.parametrize('fault', list(DATAKIT_FAULTS), ids=list(DATAKIT_FAULTS))
def test_datakit_faults_lose_no_point(monkeypatch, receiver, fault):
    from test_runner import FakeCollector
    proxy = FaultProxy(receiver.url, DATAKIT_FAULTS[fault])
    monkeypatch.setitem(core._RUNTIME, 'dff', local_runtime.LocalDFF(datakit_url=proxy.url, sleep=no_wait))
    try:
        summary = core.Runner(FakeCollector(350)).run()
    finally:
        proxy.stop()
    assert summary['points_written'] == 350
    assert sorted(set(receiver.names())) == sorted(f'i-{n}' for n in range(350))
    assert proxy.faults


def test_datakit_down_for_one_run_then_back(seed_estate, write_script, receiver):
    path = write_script('1_iam_user.py', seed_estate)
    first = cli('run', path, '--datakit', 'http://127.0.0.1:9')
    assert first.returncode == 1 and 'spooled' in first.stdout
    second = cli('run', path, '--datakit', receiver.url, '--force')
    assert second.returncode == 0, second.stdout + second.stderr
    names = receiver.names()
    # the spooled points of run 1 and the fresh ones of run 2: none lost
    for instance_id in seed_estate['ids']:
        assert names.count(instance_id) == 2
    assert 'resending 1 spooled batch(es) first' in second.stdout


def cli(*args, timeout=180):
    return subprocess.run([sys.executable, '-m', 'integration_core__runner', *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=timeout)


# -- crash safety ----------------------------------------------------------------------

WRITER = '''
import os, sys
sys.path.insert(0, {root!r})
import integration_core__runner as core
import integration_local.runtime as local_runtime
spool = core.Spool('datakit')
cache = local_runtime.FileCache()
n = 0
print('ready', flush=True)
while True:
    n += 1
    points = [{{'measurement': 'aws_ec2', 'tags': {{'name': f'k-{{os.getpid()}}-{{n}}-{{i}}'}}, 'fields': {{'message': 'x' * 5000}}}}
              for i in range(50)]
    spool.add('custom_object', [core.to_line_protocol(p) for p in points])
    cache.set('key-%d' % (n % 7), 'v' * 100000, expire=600)
'''


def test_sigkill_while_writing_leaves_no_corrupt_file(tmp_path, receiver):
    state = tmp_path / 'state'
    env = {**os.environ, 'INTEGRATION_STATE_DIR': str(state)}
    for _ in range(8):
        proc = subprocess.Popen([sys.executable, '-c', WRITER.format(root=ROOT)], env=env,
                                stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == 'ready'
        time.sleep(random.uniform(0.05, 0.4))
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        proc.stdout.close()
    spooled = sorted((state / 'spool' / 'datakit').glob('*.json'))
    assert spooled
    total = 0
    for path in spooled:
        total += len(json.loads(path.read_text())['lines'])      # every file is whole
    for path in (state / 'cache').glob('*.json'):
        assert json.loads(path.read_text())['value'] == 'v' * 100000
    # the next run delivers everything that was spooled
    delivery = core.Delivery(local_runtime.DataKitClient(receiver.url, sleep=no_wait), 'datakit',
                             spool=core.Spool('datakit', root=str(state)))
    delivery.resend_spool()
    assert delivery.written == total == len(set(receiver.names()))
    assert not list((state / 'spool' / 'datakit').glob('*.json'))


def test_two_runs_at_once_never_deliver_a_spool_twice(seed_estate, write_script, receiver):
    spool = core.Spool('datakit')
    for batch in range(5):
        spool.add('custom_object', [core.to_line_protocol({
            'measurement': 'aws_ec2', 'tags': {'name': f's-{batch}-{i}'}, 'fields': {'f': 1}})
            for i in range(20)])
    path = write_script('1_iam_user.py', seed_estate)
    args = [sys.executable, '-m', 'integration_core__runner', 'run', path, '--datakit', receiver.url]
    procs = [subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outputs = [p.communicate(timeout=180) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    names = receiver.names()
    spooled = [n for n in names if n.startswith('s-')]
    assert sorted(spooled) == sorted(f's-{b}-{i}' for b in range(5) for i in range(20))
    # one run collected; the other waited for it, then found the collection fresh
    assert sum('skipped: the last collection started' in out for out, _ in outputs) == 1
    assert all(names.count(i) == 1 for i in seed_estate['ids'])


# -- the secret scan ------------------------------------------------------------------

def test_no_secret_anywhere_at_the_most_verbose_level(seed_estate, write_script, receiver, tmp_path):
    """Every path at -vv: keys, a role, MFA, a failing role, DataKit down (spool),
    a rejected point (dead letter). Then look everywhere for the secrets."""
    outputs = []
    for name in ('1_iam_user.py', '2_assume_role.py', '3_mfa.py', '4_instance_role.py'):
        result = cli('run', write_script(name, seed_estate), '--datakit', receiver.url, '-vv', '--force')
        assert result.returncode == 0, result.stdout + result.stderr
        outputs.append(result.stdout + result.stderr)
    wrong = dict(seed_estate, **{'<AWS EXTERNAL ID>': 'wrong-external-id'})
    result = cli('run', write_script('2_assume_role.py', wrong, filename='wrong.py'),
                 '--datakit', receiver.url, '-vv', '--force')
    assert result.returncode == 1
    outputs.append(result.stdout + result.stderr)
    result = cli('run', write_script('3_mfa.py', seed_estate), '--datakit', 'http://127.0.0.1:9', '-vv', '--force')
    assert result.returncode == 1 and 'spooled' in result.stdout
    outputs.append(result.stdout + result.stderr)
    rejecting = DataKitReceiver(script=[('reject_names', [seed_estate['ids'][0]])] * 50)
    try:
        result = cli('run', write_script('3_mfa.py', seed_estate), '--datakit', rejecting.url, '-vv', '--force')
    finally:
        rejecting.stop()
    assert result.returncode == 1 and 'DataKit rejected 1 point(s)' in result.stdout
    outputs.append(result.stdout + result.stderr)

    state = tmp_path / 'state'
    secrets = {seed_estate['<AWS AK SECRET>'], seed_estate['<MFA TOTP>']}
    cache_files = list((state / 'cache').glob('*'))
    assert cache_files
    for path in cache_files:
        assert os.stat(path).st_mode & 0o777 == 0o600
        value = json.loads(path.read_text())['value']
        if value.startswith('v1:'):        # a sealed session: only the base secret opens it
            value = auth._unseal(auth._seal_keys(seed_estate['<AWS AK SECRET>']), value)
        entry = json.loads(value)
        for key in ('secret_key', 'token'):
            if key in entry:
                secrets.add(entry[key])            # temporary secrets and session tokens
        assert seed_estate['<AWS AK SECRET>'] not in path.read_text()
    assert len(secrets) >= 4
    everything = '\n'.join(outputs)
    files = [p for p in state.rglob('*') if p.is_file() and 'cache' not in p.parts]
    assert any('spool' in p.parts for p in files) and any('deadletter' in p.parts for p in files)
    names = ' '.join(str(p) for p in state.rglob('*'))
    for secret in secrets:
        assert secret not in everything
        assert secret not in names
        for path in files:
            assert secret not in path.read_text(errors='replace'), path


def test_a_startup_script_that_is_not_utf8_is_one_line(tmp_path, capsys):
    """Func keeps scripts as UTF-8 text; a Latin-1 file saved by an editor
    must be one line saying so, not a UnicodeDecodeError."""
    script = tmp_path / 'latin.py'
    script.write_bytes(b"# caf\xe9\n@DFF.API('t', fixed_crontab='*/15 * * * *')\ndef run():\n    pass\n")
    status, out, err = run_main(['run', str(script), '--output', '-'], capsys)
    assert status == 2 and 'Traceback' not in out + err
    assert err.strip() == f'error: {script}: not UTF-8 text (byte 5): save the startup script as UTF-8, as Func keeps it'
