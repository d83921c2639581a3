"""The Runner, DataKit delivery, line protocol through a real InfluxDB 1.x, and
the local runtime's command line."""
import json
import os
import re
import stat
import subprocess
import sys
import threading
import time

import pytest

import integration_core__runner as core
import integration_local.cli as local_cli
import integration_local.runtime as local_runtime
from conftest import ROOT, outside_material
from servers import DataKitReceiver


# -- line protocol through a real InfluxDB 1.x ------------------------------------



HOSTILE = [
    'plain', 'with space', 'comma,inside', 'equals=inside', 'double "quotes"',
    "single 'quotes'", 'back\\slash in the middle', 'C:\\Windows\\path', 'unicode ☃ é 中文 🚀',
    '  leading and trailing  ', 'tab\there', '#hash', 'x=1,y=2 z',
]
FIELD_ONLY = [
    'line one\nline two', '{"json": "with \\n escaped newline", "q": "\\"x\\""}',
    '{\n  "pretty": "json"\n}', 'ends with backslash \\', '\\"', '', 'back\\ slash before space',
]


def test_line_protocol_round_trip_through_influxdb(influx):
    points = []
    for index, text in enumerate(HOSTILE):
        points.append({'measurement': f'aws ec2,{index}', 'timestamp': 1700000000000000000 + index,
                       'tags': {'name': f'i-{index}', 'hostile': text, f'key {text}': 'v'},
                       'fields': {'text': text, f'field {text}': 1.5, 'n': index, 'ok': True}})
    for index, text in enumerate(FIELD_ONLY, len(HOSTILE)):
        points.append({'measurement': f'aws ec2,{index}', 'timestamp': 1700000000000000000 + index,
                       'tags': {'name': f'i-{index}'}, 'fields': {'text': text}})
    body = '\n'.join(core.to_line_protocol(p) for p in points)
    status, error = influx.write(body)
    assert status == 204, error
    for point in points:
        (row,) = influx.rows(point['measurement'])
        assert row['time'] == point['timestamp']
        for key, value in point['tags'].items():
            assert row[key] == value, (key, value, row[key])
        for key, value in point['fields'].items():
            assert row[key] == value, (key, value, row[key])


def test_tag_normalisation_never_breaks_a_line(influx):
    """What 1.x cannot carry in a tag (newlines, a trailing backslash) is
    normalised; the line and its neighbours still parse."""
    point = {'measurement': 'normalised', 'timestamp': 1700000000000000001,
             'tags': {'name': 'n', 'nl': 'a\nb', 'tail': 'c\\', 'empty': ''},
             'fields': {'f': 'x'}}
    line = core.to_line_protocol(point)
    assert '\n' not in line and 'empty=' not in line
    status, error = influx.write(line + '\nnormalised,name=m f="y" 1700000000000000002')
    assert status == 204, error
    rows = influx.rows('normalised')
    assert len(rows) == 2 and rows[0]['nl'] == 'a b' and rows[0]['tail'] == 'c'


def test_instance_tag_values_keep_the_users_text_through_influxdb(influx):
    """A Name tag with a tab, runs of spaces or outer blanks arrives as typed;
    only a line break (which would end the line) becomes a space."""
    import integration_aws_ec2__main as ec2
    names = ['web\tserver', 'two  spaces', '  outer  ', 'tab\t\tand  spaces ', ' ',
             'line\nbreak', 'crlf\r\nbreak']
    points = []
    for index, name in enumerate(names):
        instance = {'InstanceId': f'i-tag{index}', 'Tags': [{'Key': 'Name', 'Value': name}]}
        point = ec2.instance_to_point(instance, 'cn-northwest-1', {'team': name},
                                      1700000000000000000 + index)
        point['measurement'] = 'tagtext'
        points.append(point)
    status, error = influx.write('\n'.join(core.to_line_protocol(p) for p in points))
    assert status == 204, error
    rows = {row['name']: row for row in influx.rows('tagtext')}
    expected = {f'i-tag{i}': n.replace('\r\n', ' ').replace('\n', ' ') for i, n in enumerate(names)}
    assert {k: rows[k]['InstanceName'] for k in rows} == expected
    assert {k: rows[k]['team'] for k in rows} == expected


def test_field_types():
    line = core.to_line_protocol({'measurement': 'm', 'tags': {'name': 'a'},
                                  'fields': {'i': 3, 'f': 2.5, 'b': False, 's': 'x', 'd': {'k': 1},
                                             'none': None}, 'timestamp': 1700000000})
    assert line == 'm,name=a i=3i,f=2.5,b=false,s="x",d="{\\"k\\": 1}" 1700000000000000000'
    with pytest.raises(ValueError, match='no fields'):
        core.to_line_protocol({'measurement': 'm', 'tags': {'name': 'a'}, 'fields': {}})
    with pytest.raises(ValueError, match='NaN'):
        core.to_line_protocol({'measurement': 'm', 'fields': {'x': float('nan')}})


# -- the Runner with a collector of its own --------------------------------------

class FakeCollector:
    """A collector as the Runner sees one: points and per-region results."""
    category = 'custom_object'
    min_interval = 900

    def __init__(self, count=5, prefix='i', fail_region=None, identity_error=None,
                 title='Fake', field_size=10, state_key=None):
        self.count = count
        self.prefix = prefix
        self.fail_region = fail_region
        self.identity_error = identity_error
        self.title = title
        self.field_size = field_size
        self.state_key = state_key or f'fake:{prefix}'
        self.results = []
        self.collected = 0

    def identity(self):
        if self.identity_error:
            raise RuntimeError(self.identity_error)
        return {'method': 'access_key', 'account_id': '123456789012',
                'arn': 'arn:aws:iam::123456789012:user/fake', 'partition': 'aws'}

    def collect(self):
        self.collected += 1
        self.results = [{'region': 'us-east-1', 'instances': self.count, 'pages': 1,
                         'api_calls': 1, 'seconds': 0.1, 'error': None}]
        if self.fail_region:
            self.results.append({'region': self.fail_region, 'instances': 0, 'pages': 0,
                                 'api_calls': 1, 'seconds': 0.1,
                                 'error': 'ec2:DescribeInstances: AuthFailure: not enabled'})
        for n in range(self.count):
            yield {'measurement': 'aws_ec2', 'tags': {'name': f'{self.prefix}-{n}'},
                   'fields': {'message': 'x' * self.field_size}, 'timestamp': 1700000000000000000}

    def check(self):
        return [{'region': 'us-east-1', 'ok': True, 'reason': 'fine'}]


@pytest.fixture
def receiver():
    server = DataKitReceiver()
    yield server
    server.stop()


@pytest.fixture
def local(monkeypatch, receiver):
    """The local runtime writing to the receiver, retries without waiting."""
    dff = local_runtime.LocalDFF(datakit_url=receiver.url, sleep=no_wait)
    monkeypatch.setitem(core._RUNTIME, 'dff', dff)
    return dff


def no_wait(seconds):
    pass


def test_batches_of_100_to_the_custom_object_endpoint(local, receiver, caplog):
    caplog.set_level('INFO', logger='integration')
    summary = core.Runner(FakeCollector(250)).run()
    assert summary['points_written'] == 250 and summary['ok']
    assert [len(r[3]) for r in receiver.requests] == [100, 100, 50]
    path, query, headers, _ = receiver.requests[0]
    assert path == '/v1/write/custom_object'
    assert query['precision'] == 'ns' and query['input']
    assert sorted(receiver.names()) == sorted(f'i-{n}' for n in range(250))
    log = caplog.text
    assert f'DataKit connector: datakit ({receiver.url})' in log
    assert 'account 123456789012 (aws) as arn:aws:iam::123456789012:user/fake via access_key' in log
    assert 'us-east-1: 250 instance(s), 1 page(s), 1 API call(s)' in log
    assert '250 point(s) collected, 250 written' in log


def test_large_bodies_are_gzipped(local, receiver):
    core.Runner(FakeCollector(100, field_size=1000)).run()
    headers = receiver.requests[0][2]
    assert headers.get('Content-Encoding') == 'gzip'
    assert len(receiver.names()) == 100


def test_retries_on_5xx_429_and_a_dropped_connection(local, receiver):
    receiver.script = [500, 429, 'close']
    summary = core.Runner(FakeCollector(10)).run()
    assert summary['points_written'] == 10
    assert receiver.attempts == 4 and len(receiver.names()) == 10


# (Dead letters, the spool and which DataKit answers mean what: tests/test_delivery.py.)

def test_a_batch_rejected_whole_is_one_dead_letter_file(local, receiver, tmp_path, caplog):
    receiver.script = [400] * 500
    with pytest.raises(core.RunFailed):
        core.Runner(FakeCollector(12)).run()
    (dead,) = list((tmp_path / 'state' / 'deadletter' / 'datakit').iterdir())
    assert len(json.loads(dead.read_text())['points']) == 12
    assert 'DataKit rejected 12 point(s) (name=i-0, i-1, i-2, i-3, i-4, ...)' in caplog.text


def test_datakit_down_spools_and_the_next_run_sends_first(monkeypatch, tmp_path):
    down = local_runtime.LocalDFF(datakit_url='http://127.0.0.1:9', sleep=no_wait)   # nothing listens
    monkeypatch.setitem(core._RUNTIME, 'dff', down)
    with pytest.raises(core.RunFailed) as info:
        core.Runner(FakeCollector(150, prefix='a')).run()
    assert '150 point(s) not delivered' in str(info.value) and 'unreachable' in str(info.value)
    spool = tmp_path / 'state' / 'spool' / 'datakit'
    files = [p for p in spool.iterdir() if p.suffix == '.json']
    assert len(files) == 2 and all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in files)

    receiver = DataKitReceiver()
    try:
        monkeypatch.setitem(core._RUNTIME, 'dff', local_runtime.LocalDFF(datakit_url=receiver.url, sleep=no_wait))
        summary = core.Runner(FakeCollector(5, prefix='b')).run()
    finally:
        receiver.stop()
    names = receiver.names()
    assert sorted(names[:150]) == sorted(f'a-{n}' for n in range(150)), 'spooled points go first'
    assert sorted(names[150:]) == sorted(f'b-{n}' for n in range(5))
    assert summary['points_written'] == 155
    assert not [p for p in spool.iterdir() if p.suffix == '.json']


def test_while_datakit_is_down_the_spool_keeps_one_snapshot_per_collector(monkeypatch, tmp_path):
    """Three runs of the same object collector into a DataKit that is down:
    the newest snapshot replaces the older ones; another collector's stays."""
    down = local_runtime.LocalDFF(datakit_url='http://127.0.0.1:9', sleep=no_wait)
    monkeypatch.setitem(core._RUNTIME, 'dff', down)
    for run in range(3):
        with pytest.raises(core.RunFailed):
            core.Runner([FakeCollector(150, prefix=f'a{run}', state_key='ec2:a'),
                         FakeCollector(20, prefix=f'b{run}', state_key='ec2:b')], force=True).run()
    receiver = DataKitReceiver()
    try:
        monkeypatch.setitem(core._RUNTIME, 'dff', local_runtime.LocalDFF(datakit_url=receiver.url,
                                                                         sleep=no_wait))
        core.Runner(FakeCollector(1, prefix='c', state_key='ec2:c'), force=True).run()
    finally:
        receiver.stop()
    names = receiver.names()
    assert sorted(names) == sorted([f'a2-{n}' for n in range(150)] + [f'b2-{n}' for n in range(20)]
                                   + ['c-0'])


def test_slow_datakit_is_retried_after_a_timeout(monkeypatch, receiver, caplog):
    receiver.script = [('slow', 2)]
    client = local_runtime.DataKitClient(receiver.url, timeout=0.5, sleep=no_wait)
    status, _ = client.write_by_category_many('custom_object', [
        {'measurement': 'm', 'tags': {'name': 'slow'}, 'fields': {'f': 1}}])
    assert status == 200 and receiver.attempts == 2
    # Said as it is: DataKit was reached, and may have taken the batch.
    (line,) = [r.getMessage() for r in caplog.records if r.levelname == 'WARNING']
    assert line.startswith(f'[DataKit] DataKit did not answer in time: {receiver.url}: no answer '
                           'within 0.5 s; retry 1/3 in ')


def test_debug_collects_but_writes_nothing(local, receiver, tmp_path):
    summary = core.Runner(FakeCollector(20), debug=True).run()
    assert summary['points_collected'] == 20 and summary['points_written'] == 0
    assert receiver.attempts == 0


def test_fresh_collection_is_skipped_unless_forced(local, receiver, monkeypatch, caplog):
    caplog.set_level('INFO', logger='integration')
    first = FakeCollector(3)
    core.Runner(first).run()
    second = FakeCollector(3)
    summary = core.Runner(second).run()
    assert second.collected == 0 and summary['collectors'][0]['status'] == 'skipped'
    assert 'skipped: the last collection started' in caplog.text and 'INTEGRATION_FORCE=1' in caplog.text
    core.Runner(second, force=True).run()
    monkeypatch.setenv('INTEGRATION_FORCE', '1')
    core.Runner(second).run()
    assert second.collected == 2


class SlowCollector(FakeCollector):
    """Takes `duration` seconds of the injected clock to collect."""

    def __init__(self, clock, duration, **kwargs):
        super().__init__(3, **kwargs)
        self.clock, self.duration = clock, duration

    def collect(self):
        self.clock[0] += self.duration
        yield from super().collect()


def test_every_tick_of_a_15_minute_schedule_collects(local, receiver, caplog):
    """The record is the collection's start: a run's own length (here 60 s)
    or Func starting a tick 50 s late never makes the next tick skip; only a
    genuinely early start (a second trigger, a manual run) is skipped."""
    caplog.set_level('INFO', logger='integration')
    now = [1_800_000_000.0]
    collector = SlowCollector(now, duration=60)
    outcomes = []
    for start in (0, 900, 1850, 2700, 3600):          # the 1800 tick started 50 s late
        now[0] = 1_800_000_000.0 + start
        summary = core.Runner(collector, clock=lambda: now[0]).run()
        outcomes.append(summary['collectors'][0]['status'])
    assert outcomes == ['ok'] * 5 and collector.collected == 5
    for early in (3600 + 30, 3600 + 600):              # a second trigger, a manual run
        now[0] = 1_800_000_000.0 + early
        summary = core.Runner(collector, clock=lambda: now[0]).run()
        assert summary['collectors'][0]['status'] == 'skipped'
    assert 'skipped: the last collection started 600 s ago, under 900 s' in caplog.text
    assert core.schedule_grace(900) == 120 and core.schedule_grace(60) == 15


def test_collectors_that_write_differently_keep_their_own_record(local, receiver):
    """Same keys and regions, but other extra_tags, filters, after_collect or
    DataKit: none of them is skipped because another one ran."""
    import integration_aws_ec2__main as ec2
    account = {'ak_id': 'AKIAEXAMPLEEXAMPLE01', 'ak_secret': 'x' * 40}
    variants = [
        ec2.DataCollector(account, {'regions': ['us-east-1']}),
        ec2.DataCollector(dict(account, extra_tags={'team': 'a'}), {'regions': ['us-east-1']}),
        ec2.DataCollector(account, {'regions': ['us-east-1']}, filters=[lambda o: o['State'] == 'running']),
        ec2.DataCollector(account, {'regions': ['us-east-1']}, filters=[lambda o: o['State'] == 'stopped']),
        ec2.DataCollector(account, {'regions': ['us-east-1']}, after_collect=lambda p: p),
        ec2.DataCollector(account, {'regions': ['us-east-1', 'us-west-2']}),
        ec2.DataCollector(account, {'regions': ['us-east-1'], 'page_size': 50}),
    ]
    keys = [v.state_key for v in variants]
    assert len(set(keys)) == len(keys)
    # Stable: the same collector made again (a new task in Func) has the same key.
    again = ec2.DataCollector(account, {'regions': ['us-east-1']}, filters=[lambda o: o['State'] == 'running'])
    assert again.state_key == keys[2]
    # Two Runners, one collector each, same estate, other DataKit connectors.
    first, second = FakeCollector(2, state_key='same'), FakeCollector(2, state_key='same')
    core.Runner(first, datakit_id='datakit').run()
    core.Runner(second, datakit_id='datakit_backup').run()
    assert first.collected == second.collected == 1


def test_one_failure_does_not_stop_the_others_and_is_raised_once(local, receiver, caplog):
    caplog.set_level('INFO', logger='integration')
    collectors = [FakeCollector(2, prefix='a', identity_error='InvalidClientTokenId: revoked'),
                  FakeCollector(3, prefix='b', fail_region='ap-east-1'),
                  FakeCollector(4, prefix='c')]
    with pytest.raises(core.RunFailed) as info:
        core.Runner(collectors).run()
    assert sorted(receiver.names()) == sorted(['b-0', 'b-1', 'b-2', 'c-0', 'c-1', 'c-2', 'c-3'])
    message = str(info.value)
    assert '#1 Fake: account: RuntimeError: InvalidClientTokenId: revoked' in message
    assert '#2 Fake: 1 region(s) failed: ap-east-1' in message
    statuses = [c['status'] for c in info.value.summary['collectors']]
    assert statuses == ['failed', 'failed', 'ok']
    assert caplog.text.count('InvalidClientTokenId') == 1
    assert 'ap-east-1 FAILED: ec2:DescribeInstances: AuthFailure' in caplog.text


def test_inside_func_the_real_dff_is_used(monkeypatch, capsys):
    """Func injects DFF; its connector's write_by_category_many is what runs."""
    written = []

    class Connector:
        def write_by_category_many(self, category, data):
            written.append((category, len(data)))
            return 200, ''

    class Func:
        CACHE = local_runtime.FileCache()

        @staticmethod
        def SRC(connector_id):
            assert connector_id == 'my_datakit'
            return Connector()

    monkeypatch.setattr(core, 'DFF', Func, raising=False)
    core.Runner(FakeCollector(120), datakit_id='my_datakit').run()
    assert written == [('custom_object', 100), ('custom_object', 20)]
    printed = capsys.readouterr().out      # Func's task log is what the script prints
    assert '[INFO] [Runner] DataKit connector: my_datakit (Func connector)' in printed
    assert 'us-east-1: 120 instance(s)' in printed


class EntityNotFound(Exception):
    """What Func's DFF.SRC raises for an id no connector has."""


class FuncWithoutConnector:
    CACHE = local_runtime.FileCache()

    @staticmethod
    def SRC(connector_id):
        raise EntityNotFound(f'Connector not found: `{connector_id}`')


def test_debug_needs_no_connector(monkeypatch, capsys):
    """debug=True writes nothing: a script tried before its connector exists runs."""
    monkeypatch.setattr(core, 'DFF', FuncWithoutConnector, raising=False)
    collector = FakeCollector(3)
    summary = core.Runner(collector, debug=True).run()
    assert summary['points_collected'] == 3 and summary['points_written'] == 0
    printed = capsys.readouterr().out
    assert ("[Runner] no DataKit connector 'datakit' (Connector not found: `datakit`): none is "
            'needed with debug=True') in printed
    assert 'DataKit connector: datakit (none) - debug: collecting only' in printed


def test_a_missing_connector_is_one_line_before_collecting(monkeypatch):
    monkeypatch.setattr(core, 'DFF', FuncWithoutConnector, raising=False)
    collector = FakeCollector(3)
    with pytest.raises(core.ConfigError) as error:
        core.Runner(collector, datakit_id='dk').run()
    assert str(error.value) == (
        "Runner(datakit_id='dk'): Func has no DataKit connector with that id (Connector not found: "
        "`dk`); create one (Development > Connectors, type DataKit) with that id, or pass the id of "
        'yours')
    assert collector.collected == 0


# -- the local DFF --------------------------------------------------------------------

def test_file_cache_honours_expiry_and_is_private(tmp_path):
    now = [1000.0]
    cache = local_runtime.FileCache(str(tmp_path), clock=lambda: now[0])
    cache.set('k', '{"a": 1}', expire=10)
    assert cache.get('k') == '{"a": 1}'
    (path,) = list((tmp_path / 'cache').iterdir())
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and 'k' not in path.name
    now[0] += 11
    assert cache.get('k') is None


def test_file_cache_behaves_as_funcs():
    """Func's DFF.CACHE (Redis): str, int and float values come back as str,
    `expires=` as well as `expire=`, and anything else raises."""
    now = [1000.0]
    cache = local_runtime.FileCache(clock=lambda: now[0])
    cache.set('n', 5, expires=10)
    cache.set('f', 2.5)
    assert cache.get('n') == '5' and cache.get('f') == '2.5'
    for bad in ({'a': 1}, ['x'], None, True):
        with pytest.raises(TypeError, match='must be a str, int or float'):
            cache.set('bad', bad)
    now[0] += 11
    assert cache.get('n') is None and cache.get('f') == '2.5'
    assert cache.set('f', 'x', not_exists=True) is False and cache.get('f') == '2.5'


def test_file_cache_treats_foreign_content_as_absent(tmp_path):
    cache = local_runtime.FileCache(str(tmp_path))
    cache.set('k', 'v')
    (path,) = list((tmp_path / 'cache').iterdir())
    for foreign in ('[1, 2]', '{"value": {"x": 1}}', '{"other": 1}', 'not json', '"text"'):
        path.write_text(foreign)
        assert cache.get('k') is None, foreign


@pytest.mark.parametrize('options,expected', [
    ({'fixed_crontab': '*/15 * * * * *'}, 'must have 5 fields'),
    ({'fixed_crontab': '61 * * * *'}, 'not a valid crontab'),
    ({'timeout': 0}, 'timeout must be a whole number of seconds from 1 to 3600'),
    ({'timeout': 3601}, 'from 1 to 3600'),
    ({'timeout': 'long'}, 'from 1 to 3600'),
])
def test_dff_api_options_are_validated(options, expected):
    with pytest.raises(core.ConfigError, match=expected):
        local_runtime.LocalDFF().API('AWS-EC2 Collection', **options)


def test_env_reads_the_environment(monkeypatch):
    monkeypatch.setenv('MY_SETTING', '{"a": 1}')
    monkeypatch.setenv('PLAIN', 'text')
    assert local_runtime.LocalDFF.ENV('MY_SETTING') == {'a': 1}
    assert local_runtime.LocalDFF.ENV('PLAIN') == 'text' and local_runtime.LocalDFF.ENV('MISSING') is None


# -- the command line -------------------------------------------------------------------

def cli(*args, env=None, timeout=120):
    """`python -m integration_core__runner ...` as a user runs it."""
    return subprocess.run([sys.executable, '-m', 'integration_core__runner', *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=timeout,
                          env={**os.environ, **(env or {})})


SEED_SCRIPTS = ['1_iam_user.py', '2_assume_role.py', '3_mfa.py', '4_instance_role.py']


@pytest.mark.parametrize('name', SEED_SCRIPTS)
def test_seed_scripts_run_unmodified(seed_estate, write_script, receiver, name):
    path = write_script(name, seed_estate)
    result = cli('run', path, '--datakit', receiver.url)
    assert result.returncode == 0, result.stdout + result.stderr
    assert set(seed_estate['ids']) <= set(receiver.names())
    assert 'cloud_provider=AWS' in receiver.lines[0]
    out = result.stdout
    expected_arn = {
        '1_iam_user.py': seed_estate['user']['arn'],
        '2_assume_role.py': f"assumed-role/{seed_estate['role'].split('/')[-1]}/Integration",
        '3_mfa.py': f"assumed-role/{seed_estate['role'].split('/')[-1]}/Integration",
        '4_instance_role.py': f"assumed-role/{seed_estate['instance_role'].split('/')[-1]}/",
    }[name]
    assert expected_arn in out and 'account 123456789012 (aws-cn)' in out
    assert 'cn-northwest-1: ' in out and 'instance(s)' in out
    if name == '4_instance_role.py':
        assert all('account_name=role\\ for\\ ec2' in line for line in receiver.lines)
    for secret in (seed_estate['<AWS AK SECRET>'], seed_estate['<MFA TOTP>']):
        assert secret not in out + result.stderr


@pytest.mark.parametrize('filename', ['org.py', 'secrets.py', 'copy.py', 'json.py'])
def test_a_script_named_like_a_library_module_runs(seed_estate, write_script, receiver, filename):
    """The script's folder is not put on sys.path: org.py (which `copy` probes
    for Jython), secrets.py, copy.py or json.py replace no module, and the
    integration modules beside it still import."""
    path = write_script('1_iam_user.py', seed_estate, filename=filename)
    result = cli('run', path, '--datakit', receiver.url, '--force')
    assert result.returncode == 0, result.stdout + result.stderr
    assert set(seed_estate['ids']) <= set(receiver.names())
    out = result.stdout + result.stderr
    if filename != 'org.py':    # no module `org` exists to be confused with
        stem = filename[:-3]
        assert (f"has the name of the module {stem!r}" in out
                and f'`import {stem}` anywhere means that module, never this file' in out), out


def test_siblings_beside_the_script_are_found_by_script_id(seed_estate, tmp_path, receiver):
    """Modules saved beside the script under their Func script ids (as a user
    copies them out of Func) are what the script imports."""
    from paste_table import paste_table
    from integration_local.emulator import fill_placeholders
    folder = tmp_path / 'scripts'
    folder.mkdir()
    for name, script_id in paste_table().items():
        text = open(os.path.join(ROOT, name), encoding='utf-8').read()
        (folder / f'{script_id}.py').write_text(text.replace('"""', '"""[copy beside the script] ', 1))
    script = folder / 'my_ec2.py'
    script.write_text(fill_placeholders(open(os.path.join(ROOT, 'scripts', '1_iam_user.py')).read(),
                                        seed_estate) + '\nimport integration_aws__auth as _a\n'
                      'assert _a.__doc__.startswith("[copy beside the script]"), _a.__file__\n')
    result = cli('run', str(script), '--datakit', receiver.url, '--force')
    assert result.returncode == 0, result.stdout + result.stderr
    assert set(seed_estate['ids']) <= set(receiver.names())


def test_scripts_match_the_seed_page():
    """Character for character apart from placeholders and indentation."""
    seed_path = outside_material(os.path.join(ROOT, '..', 'shared', 'seed', '000_17d36fb815bf6420.txt'),
                                 "the user's page (../shared/seed)")
    seed = open(seed_path, encoding='utf-8').read()
    for name in SEED_SCRIPTS:
        text = open(os.path.join(ROOT, 'scripts', name), encoding='utf-8').read()
        assert "@DFF.API('AWS-EC2 Collection', timeout=3600, fixed_crontab='*/15 * * * *')" in text
        assert 'from integration_core__runner import Runner' in text
        assert 'import integration_aws_ec2__main as main' in text
        for line in text.splitlines():
            squashed = ' '.join(line.split())
            if squashed and not squashed.startswith('#'):
                assert squashed in ' '.join(seed.split()), (name, line)


def test_output_prints_line_protocol(seed_estate, write_script):
    path = write_script('1_iam_user.py', seed_estate)
    result = cli('run', path, '--output', '-')
    assert result.returncode == 0, result.stderr
    lines = [l for l in result.stdout.splitlines() if l.startswith('aws_ec2,')]
    assert len(lines) >= 3 and all('cloud_provider=AWS' in l for l in lines)


def test_check_says_skip_for_what_is_left_out_by_design(monkeypatch, capsys):
    """A row left out by design (a suspended account, a management account
    whose role AWS refuses) is neither OK nor a failure."""
    collector = FakeCollector()
    collector.check = lambda: [
        {'region': '111122223333 us-east-1', 'ok': True, 'reason': 'fine'},
        {'region': '444455556666', 'ok': True, 'skipped': True, 'reason': 'skipped: the account is SUSPENDED'}]
    monkeypatch.setitem(core._RUNTIME, 'mode', 'check')
    result = core.Runner(collector).run()
    lines = capsys.readouterr().out.splitlines()
    assert re.fullmatch(r'#1  111122223333 us-east-1  OK    fine', lines[1])
    assert re.fullmatch(r'#1  444455556666\s+SKIP  skipped: the account is SUSPENDED', lines[2])
    assert result['ok']
    collector.check = lambda: [{'region': 'us-east-1', 'ok': False, 'reason': 'denied'}]
    assert not core.Runner(collector).run()['ok']


def test_check_prints_a_table_and_writes_nothing(seed_estate, write_script, receiver):
    path = write_script('2_assume_role.py', seed_estate)
    result = cli('check', path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert '#1  identity' in result.stdout and 'OK' in result.stdout
    assert '#1  cn-northwest-1  OK    ec2:DescribeInstances allowed' in result.stdout
    assert receiver.attempts == 0


def test_check_reports_failure(seed_estate, write_script):
    values = dict(seed_estate, **{'<AWS EXTERNAL ID>': 'wrong-external-id'})
    result = cli('check', write_script('2_assume_role.py', values))
    assert result.returncode == 1
    assert 'FAIL' in result.stdout and 'AccessDenied' in result.stdout


def test_unreachable_datakit_exits_non_zero(seed_estate, write_script):
    path = write_script('1_iam_user.py', seed_estate)
    result = cli('run', path, '--datakit', 'http://127.0.0.1:9')
    assert result.returncode == 1
    assert 'DataKit unreachable' in result.stdout and 'spooled' in result.stdout
    assert 'Traceback' not in result.stdout + result.stderr


BAD_SCRIPTS = [
    ('x = 1\n', 'no function decorated with @DFF.API'),
    ("@DFF.API('t', fixed_crontab='0 */15 * * * *')\ndef run():\n    pass\n", 'must have 5 fields'),
    ("@DFF.API('t', timeout=0)\ndef run():\n    pass\n", 'from 1 to 3600'),
    ("@DFF.API('t', timeout=7200)\ndef run():\n    pass\n", 'from 1 to 3600'),
    ("raise RuntimeError('boom at import')\n", 'the script failed while loading: RuntimeError: boom at import (line 1)'),
    ("import no_such_module_here\n", "No module named 'no_such_module_here'"),
    ("def broken(:\n", 'syntax error'),
]


@pytest.mark.parametrize('text,expected', BAD_SCRIPTS, ids=[e for _, e in BAD_SCRIPTS])
def test_bad_scripts_get_one_line_and_exit_2(write_script, text, expected):
    result = cli('run', write_script(text))
    assert result.returncode == 2
    assert expected in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert 'Traceback' not in result.stderr + result.stdout


def test_missing_script_and_unknown_func(write_script):
    result = cli('run', '/nonexistent/script.py')
    assert result.returncode == 2 and 'no such startup script' in result.stderr
    ok = write_script("@DFF.API('t')\ndef run():\n    pass\n")
    result = cli('run', ok, '--func', 'other')
    assert result.returncode == 2 and "no @DFF.API function named 'other'" in result.stderr


def test_bad_account_in_a_script_exits_2_before_any_call(aws, write_script):
    text = open(os.path.join(ROOT, 'scripts', '1_iam_user.py')).read().replace(
        '"ak_secret"', '"ak_secrte"')
    with aws.recording() as calls:
        result = cli('run', write_script(text, {'<AWS AK ID>': 'AKIAEXAMPLE000000001',
                                                '<AWS AK SECRET>': 'SECRETVALUE0000000000000'}))
    assert result.returncode == 2
    assert "account['ak_secrte'] is not a known key; did you mean 'ak_secret'?" in result.stdout + result.stderr
    assert 'SECRETVALUE' not in result.stdout + result.stderr
    assert calls == []


def test_a_run_past_its_timeout_is_stopped(write_script):
    text = "import time\n@DFF.API('slow', timeout=1)\ndef run():\n    time.sleep(30)\n"
    started = time.monotonic()
    result = cli('run', write_script(text))
    assert result.returncode == 1 and 'stopped after its timeout of 1 s' in result.stdout
    assert time.monotonic() - started < 20


# -- serve: the crontab ---------------------------------------------------------------

class FakeClock:
    def __init__(self, start):
        self.now = start
        self.lock = threading.Lock()

    def __call__(self):
        with self.lock:
            return self.now

    def set(self, value):
        with self.lock:
            self.now = value


def wait_for(predicate, timeout=15):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_serve_fires_on_the_crontab_and_skips_an_overlapping_tick(tmp_path):
    marker = tmp_path / 'runs'
    marker.mkdir()

    def job():
        (marker / str(time.time_ns())).write_text('x')
        time.sleep(1.5)

    api = {'title': 'job', 'name': 'job', 'timeout': 30, 'fixed_crontab': '* * * * *', 'func': job}
    clock = FakeClock(1_800_000_030.0)           # 30 s past a minute
    scheduler = local_cli.Scheduler([api], clock=clock, tick=0.05)
    thread = threading.Thread(target=scheduler.serve, daemon=True)
    thread.start()
    try:
        time.sleep(0.3)
        assert scheduler.history == []           # not yet the next minute
        clock.set(1_800_000_060.0)
        assert wait_for(lambda: ('job', 'started') in scheduler.history)
        clock.set(1_800_000_120.0)               # next minute while the first still runs
        assert wait_for(lambda: ('job', 'skipped') in scheduler.history)
        assert wait_for(lambda: ('job', 'exit 0') in scheduler.history)
        clock.set(1_800_000_180.0)
        assert wait_for(lambda: scheduler.history.count(('job', 'exit 0')) == 2)
    finally:
        scheduler.stop.set()
        thread.join(15)
    assert len(list(marker.iterdir())) == 2


def test_serve_kills_a_run_past_its_timeout():
    api = {'title': 'hang', 'name': 'hang', 'timeout': 1, 'fixed_crontab': '* * * * *',
           'func': lambda: time.sleep(60)}
    clock = FakeClock(1_800_000_059.0)
    scheduler = local_cli.Scheduler([api], clock=lambda: clock() + 0, tick=0.05)
    thread = threading.Thread(target=scheduler.serve, daemon=True)
    thread.start()
    try:
        clock.set(1_800_000_060.0)
        assert wait_for(lambda: ('hang', 'started') in scheduler.history)
        assert wait_for(lambda: ('hang', 'killed') in scheduler.history)
    finally:
        scheduler.stop.set()
        thread.join(15)


def test_serve_stops_cleanly_on_sigterm(write_script):
    path = write_script("@DFF.API('t', fixed_crontab='*/15 * * * *')\ndef run():\n    pass\n")
    proc = subprocess.Popen([sys.executable, '-m', 'integration_core__runner', 'serve', path],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(1.5)
        proc.terminate()
        out, err = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert 'next run at' in out and 'stopping' in out


SERVE_GRACE = '''
import sys, time
sys.path.insert(0, {root!r})
import integration_local.cli as cli
cli._setup_logging(0)
offset = time.time() % 60 - 59.7            # a minute boundary 0.3 s from now
def job():
    time.sleep({job_seconds})
    open({marker!r}, 'w').write('finished')
api = {{'title': 'job', 'name': 'job', 'timeout': 60, 'fixed_crontab': '* * * * *', 'func': job}}
sys.exit(cli.Scheduler([api], clock=lambda: time.time() - offset, tick=0.05, grace={grace}).serve())
'''


@pytest.mark.parametrize('signal_name', ['SIGTERM', 'SIGINT'])
def test_serve_gives_running_jobs_their_grace_on_a_group_signal(tmp_path, signal_name):
    """A systemd stop or a Ctrl-C reaches the whole process group: the running
    job still finishes, and the log says how it ended."""
    import signal
    marker = tmp_path / 'marker'
    code = SERVE_GRACE.format(root=ROOT, job_seconds=2, marker=str(marker), grace=30)
    proc = subprocess.Popen([sys.executable, '-c', code], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        time.sleep(1.2)                          # fired at +0.3 s, sleeping until +2.3 s
        os.killpg(proc.pid, getattr(signal, signal_name))
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert marker.read_text() == 'finished', out
    assert 'waiting up to 30 s for 1 running job(s)' in out
    assert 'job: finished during shutdown (exit 0)' in out and proc.returncode == 0


def test_serve_kills_a_job_still_running_after_the_grace(tmp_path):
    import signal
    marker = tmp_path / 'marker'
    code = SERVE_GRACE.format(root=ROOT, job_seconds=30, marker=str(marker), grace=1)
    proc = subprocess.Popen([sys.executable, '-c', code], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        time.sleep(1.2)
        started = time.monotonic()
        os.killpg(proc.pid, signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert time.monotonic() - started < 10
    assert not marker.exists()
    assert 'job: still running after the 1 s grace period; killed' in out


def test_a_pool_starts_a_thread_per_task_up_to_its_size_and_ends_them_all():
    """Workers: the first task runs before the pool's other threads exist;
    never more threads than its size; stop() ends every one; a task handed
    to a stopped pool is settled with an error, never left waiting."""
    pool = core.Workers(3, 'pooltest')
    started = threading.Event()
    release = threading.Event()
    first = pool.run(lambda: (started.set(), release.wait(10)))
    assert started.wait(10)

    def ours():
        return [t for t in threading.enumerate() if t.name.startswith('integration-pooltest-')]
    assert len(ours()) == 1
    futures = [pool.run(time.sleep, 0.05) for _ in range(6)]
    assert len(ours()) == 3
    release.set()
    for future in [first] + futures:
        future.result(10)
    pool.stop(5)
    assert not [t for t in ours() if t.is_alive()]
    late = pool.run(lambda: 'never')
    with pytest.raises(core.Cancelled):
        late.result(1)


def test_a_pool_thread_that_cannot_start_leaves_the_work_to_the_others(monkeypatch, caplog):
    """"can't start new thread": with a thread running, the task still runs,
    once; with none, submit() says so and queues nothing."""
    starts = []
    real_start = threading.Thread.start

    def start(thread):
        starts.append(thread.name)
        if len(starts) > 1:
            raise RuntimeError("can't start new thread")
        real_start(thread)
    monkeypatch.setattr(threading.Thread, 'start', start)
    pool = core.Workers(3, 'startfail')
    ran = []
    futures = [pool.run(ran.append, n) for n in range(3)]
    assert [f.result(10) for f in futures] == [None] * 3 and sorted(ran) == [0, 1, 2]
    assert 'a startfail thread could not start: 1 thread(s) do the work' in caplog.text
    pool.stop(5)
    empty = core.Workers(2, 'startfail-none')
    starts.append('make the next start fail')
    with pytest.raises(RuntimeError, match="can't start"):
        empty.run(ran.append, 'never')
    assert empty._tasks.empty()         # nothing queued for a thread that is not there
    empty.stop(1)
    assert 'never' not in ran


def test_tag_values_keep_their_rules():
    assert core.tag_value('web server\t ') == 'web server\t '
    assert core.tag_value('a\r\nb\nc') == 'a b c'
    assert core.tag_value('x' * 1024) == 'x' * 1024 and len(core.tag_value('x' * 1025)) == 1024
    assert core.tag_value('é' * 600).encode() == ('é' * 512).encode()
    assert core.tag_value(42) == '42' and core.tag_value(None) is None
    with pytest.raises(UnicodeEncodeError):
        core.tag_value('ops\udcff')        # no UTF-8: as before


class _Linker:
    """A metric collector as ObjectLinks sees one: it takes the map."""
    category = 'metric'
    title = 'metrics'
    objects = None

    def link_objects(self, objects):
        self.objects = objects


def _dff(tmp_path):
    """A DFF whose CACHE is the local runtime's, in `tmp_path`."""
    return type('Dff', (), {'CACHE': local_runtime.FileCache(str(tmp_path))})


def test_object_links_keep_the_last_map_of_what_a_run_did_not_collect(tmp_path):
    """An Organization's run within 15 minutes collects only some accounts,
    and a region may fail: the metrics of the others keep the last map's tags;
    the regions a collector read in full have this run's (an instance gone
    from them is gone from the map); another collector's objects (another
    script of the same Organization, another account) are not its to drop;
    an object nobody saw for LINK_TTL goes."""
    Dff = _dff(tmp_path)

    class Source:
        category = 'custom_object'

        def __init__(self, key, results, accounts=None):
            self.state_key, self.results = key, results
            if accounts is not None:
                self.accounts = lambda: accounts

    def instance(name, account, region):
        tags = {'name': name, 'RegionId': region, 'InstanceName': name}
        return {'tags': dict(tags, AccountId=account) if account else tags}

    def ok(account, region, error=None):
        return {'account': account, 'region': region, 'error': error}

    def run(now, *sources, script=None):
        """sources: (Source, its points) that ran, of the script's (by default
        those); the linker's map after them."""
        linker = _Linker()
        links = core.ObjectLinks((script or [source for source, _ in sources]) + [linker], Dff, now=now)
        for source, points in sources:
            for point in points:
                links.note(source, point)
            links.after(source)
        links.before(linker)
        return sorted(linker.objects)
    t = 1_800_000_000
    org = [instance('i-a1', 'A', 'r1'), instance('i-a2', 'A', 'r2'), instance('i-b1', 'B', 'r1')]
    assert run(t, (Source('org', [ok('A', 'r1'), ok('A', 'r2'), ok('B', 'r1')]), org)) == ['i-a1', 'i-a2', 'i-b1']
    # B skipped (collected minutes ago), A's r2 failed, i-a1 terminated: A r1 is this run's.
    assert run(t + 300, (Source('org', [ok('A', 'r1'), ok('A', 'r2', 'denied')],
                                [{'account_id': 'A'}, {'account_id': 'B', 'skipped': 'fresh'}]), [])) == ['i-a2', 'i-b1']
    # Another script of the Organization (the same key: accounts split between
    # scripts) reads only C: it keeps A's and B's objects.
    assert run(t + 360, (Source('org', [ok('C', 'r1')], [{'account_id': 'C'}]),
                         [instance('i-c1', 'C', 'r1')])) == ['i-a2', 'i-b1', 'i-c1']
    # A read in full again: i-a2 is gone; B, suspended, not seen for an hour: gone too.
    assert run(t + 3700, (Source('org', [ok('A', 'r1'), ok('A', 'r2')], [{'account_id': 'A'}]),
                          [instance('i-a3', 'A', 'r1')])) == ['i-a3', 'i-c1']
    # Two accounts' collectors in one script: one's run does not drop the
    # other's objects, whose AccountId, an extra tag, decides nothing.
    Dff.CACHE = local_runtime.FileCache(str(tmp_path / 'two'))
    x, y = instance('i-x', 'X', 'r1'), instance('i-y', None, 'r1')

    sx, sy = Source('x', None), Source('y', None)

    def read(source, error=None):
        source.results = [{'region': 'r1', 'error': error}]
        return source
    script = [sx, sy]
    assert run(t, (read(sx), [x]), (read(sy), [y]), script=script) == ['i-x', 'i-y']
    assert run(t + 300, (read(sy), []), script=script) == ['i-x']
    assert run(t + 600, (read(sx, 'denied'), []), script=script) == ['i-x']
    assert run(t + 900, (read(sx), []), script=script) == []


def test_object_links_of_two_scripts_that_write_the_map_at_once_keep_both(tmp_path):
    """Two scripts of one Organization (its accounts split between them) end
    their EC2 collection at the same moment: B read the map before A wrote
    it, and writes it after. At the end of A's run its objects are put back
    beside B's (they would be missing until A's next object collection)."""
    Dff = _dff(tmp_path)

    class Source:
        category = 'custom_object'
        state_key = 'org'

        def __init__(self, account):
            self.results = [{'account': account, 'region': 'r1', 'error': None}]

    def point(name, account):
        return {'tags': {'name': name, 'AccountId': account, 'RegionId': 'r1'}}
    t = 1_800_000_000
    a, b = Source('A'), Source('B')
    links_a = core.ObjectLinks([a, _Linker()], Dff, now=t)
    links_b = core.ObjectLinks([b, _Linker()], Dff, now=t)
    before_a_wrote = links_b._last()
    links_b._last = lambda: before_a_wrote
    links_a.note(a, point('i-a1', 'A'))
    links_a.after(a)
    links_b.note(b, point('i-b1', 'B'))
    links_b.after(b)                    # from what it read before A wrote
    del links_b._last
    links_a.end()
    links_b.end()
    linker = _Linker()
    core.ObjectLinks([a, linker], Dff, now=t + 60).before(linker)
    assert sorted(linker.objects) == ['i-a1', 'i-b1']


def test_a_datakit_that_cannot_be_reached_in_time_is_unreachable_one_that_does_not_answer_is_slow(
        monkeypatch, caplog):
    import socket
    import urllib.error
    client = local_runtime.DataKitClient('http://127.0.0.1:9', timeout=1, attempts=1, sleep=no_wait)
    point = {'measurement': 'm', 'tags': {'name': 'x'}, 'fields': {'f': 1}}
    for raised, said in ((urllib.error.URLError(socket.timeout('timed out')), 'DataKit unreachable: '
                          'http://127.0.0.1:9: timed out'),
                         (TimeoutError('timed out'), 'DataKit did not answer in time: '
                          'http://127.0.0.1:9: no answer within 1 s')):
        def fail(*args, **kwargs):
            raise raised
        monkeypatch.setattr(local_runtime._NO_REDIRECTS, 'open', fail)
        with pytest.raises(core.DataKitError) as info:
            client.write_by_category_many('custom_object', [point])
        assert str(info.value) == said


def test_a_task_that_raises_leaves_the_pool_working(caplog):
    import threading
    pool = core.Workers(1, 'test', share=1)
    ran, done = [], threading.Event()

    def fail():
        raise ValueError('a bug')
    try:
        pool.submit(fail, group='a')
        pool.submit(ran.append, 'a2', group='a')
        pool.submit(ran.append, 'b1', group='b')
        pool.submit(done.set)
        assert done.wait(5)
    finally:
        pool.stop(5)
    assert sorted(ran) == ['a2', 'b1']
    assert '[test] a task failed: ValueError: a bug' in caplog.text


def test_object_links_edge_cases(tmp_path):
    """Two collectors of one script each drop their own gone instances,
    whatever their order; a metric collector placed first changes nothing; a
    collection stopped part-way read nothing in full; a time from a clock
    that was ahead, a damaged time and a map of the version before all
    expire."""
    Dff = _dff(tmp_path)

    class Source:
        category = 'custom_object'
        title = 'objects'

        def __init__(self, key):
            self.state_key, self.results = key, [{'region': 'r1', 'error': None}]

    def point(name):
        return {'tags': {'name': name, 'RegionId': 'r1'}}
    x, y, linker = Source('x'), Source('y'), _Linker()

    def run(now, ran, order=None, stopped=False):
        links = core.ObjectLinks(order or [x, y, linker], Dff, now=now)
        if order and order[0] is linker:
            links.before(linker)
        for source, names in ran:
            for name in names:
                links.note(source, point(name))
            links.after(source, stopped=stopped)
        links.before(linker)
        return sorted(linker.objects)
    t = 1_800_000_000
    assert run(t, [(x, ['i-x']), (y, ['i-y'])]) == ['i-x', 'i-y']
    assert run(t + 300, [(x, ['i-x']), (y, [])]) == ['i-x']          # y's gone, x ran first
    assert run(t + 600, [(x, ['i-x']), (y, ['i-y'])]) == ['i-x', 'i-y']
    assert run(t + 900, [(x, []), (y, ['i-y'])]) == ['i-y']          # x's gone, y ran last
    assert run(t + 1200, [(x, ['i-x'])], order=[linker, x, y]) == ['i-x', 'i-y']
    assert run(t + 1500, [(x, [])], order=[linker, x, y]) == ['i-y']
    # Stopped part-way: nothing was read in full, nothing goes.
    assert run(t + 1800, [(y, [])], stopped=True) == ['i-y']
    # A clock a day ahead, then right again: an hour later, gone.
    assert run(t + 86400, [(x, ['i-ahead'])]) == ['i-ahead']      # i-y not seen for a day
    assert run(t + 2000, [(y, ['i-y'])]) == ['i-ahead', 'i-y']
    assert run(t + 2000 + 3601, [(y, ['i-y'])]) == ['i-y']
    # A damaged time, and the map of the version before (no times): gone
    # within half an hour unless seen again.
    key = core.ObjectLinks([x, y, linker], Dff).key
    Dff.CACHE.set(key, core.pack_json({'keys': ['RegionId'], 'rows': {'i-old': ['r1'], 'i-nan': ['r1']},
                                       'seen': {'i-nan': ['x', 'nan']}}), expires=3600)
    assert run(t + 9000, [(y, ['i-y'])]) == ['i-nan', 'i-old', 'i-y']
    assert run(t + 9000 + 1801, [(y, ['i-y'])]) == ['i-y']
