"""Delivery to DataKit as a user sees it: which answers are bad points and
which a wrong configuration, the spool (line protocol, replayed byte for byte,
each point once, bounded), dead letters, and the state directory they live in.
Every path runs through our local DataKit client and through DataFlux Func's
own DataKit helper (../shared/dataflux-func), against a DataKit-like receiver
and a real InfluxDB 1.x parser, all on loopback."""
import datetime
import importlib.util
import json
import os
import stat
import subprocess
import sys
import time
import urllib.parse
import warnings

import pytest

import integration_core__runner as core
import integration_local.runtime as local_runtime
from conftest import ROOT, outside_material
from servers import DataKitReceiver
from test_runner import FakeCollector

FUNC_DATAKIT = os.path.join(ROOT, '..', 'shared', 'dataflux-func', 'worker', 'utils',
                            'extra_helpers', 'datakit.py')
DOWN = 'http://127.0.0.1:9'          # nothing listens there


def no_wait(seconds):
    pass


# -- fixtures: a receiver, InfluxDB, our DFF and Func's ---------------------------------------

@pytest.fixture
def receiver():
    server = DataKitReceiver()
    yield server
    server.stop()




def func_datakit_class():
    """DataFlux Func's own DataKit client (worker/utils/extra_helpers/datakit.py:
    standard library only), loaded from the Func source beside the repository."""
    path = outside_material(FUNC_DATAKIT, "DataFlux Func's DataKit helper (../shared/dataflux-func)")
    spec = importlib.util.spec_from_file_location('func_extra_helpers_datakit', path)
    module = importlib.util.module_from_spec(spec)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', DeprecationWarning)     # its '\s' regex literal
        spec.loader.exec_module(module)
    return module.DataKit


class FuncDataKitHelper:
    """What DFF.SRC('datakit') returns in Func (datakit_helper.DataKitHelper):
    Func's DataKit client behind a __getattr__ that hands every name to it."""

    def __init__(self, url):
        parts = urllib.parse.urlsplit(url)
        self.client = func_datakit_class()(host=parts.hostname, port=parts.port, protocol='http',
                                           timeout=5)

    def __getattr__(self, name):
        return self.client.__getattribute__(name)


class FuncDFF:
    """Func's DFF as a script sees it, for what the Runner uses of it."""

    def __init__(self, url):
        self.url = url
        self.CACHE = local_runtime.FileCache()

    def SRC(self, connector_id='datakit'):
        return FuncDataKitHelper(self.url)

    @staticmethod
    def ENV(name):
        return None


@pytest.fixture(params=['local', 'func'])
def use(request, monkeypatch):
    """use(url): DataKit at `url` through our local runtime, or through Func's
    own DataKit helper (DFF injected as Func does it)."""
    def install(url):
        if request.param == 'local':
            monkeypatch.setitem(core._RUNTIME, 'dff',
                                local_runtime.LocalDFF(datakit_url=url, sleep=no_wait))
        else:
            monkeypatch.setattr(core, 'DFF', FuncDFF(url), raising=False)
    install.kind = request.param
    return install


def connector(kind, url):
    if kind == 'local':
        return local_runtime.DataKitClient(url, sleep=no_wait)
    return FuncDataKitHelper(url)


class PointsCollector(FakeCollector):
    """A collector that yields the given points."""

    def __init__(self, points, **kwargs):
        super().__init__(len(points), **kwargs)
        self.points = points

    def collect(self):
        self.collected += 1
        self.results = [{'region': 'us-east-1', 'instances': len(self.points), 'pages': 1,
                         'api_calls': 1, 'seconds': 0.1, 'error': None}]
        yield from (dict(p) for p in self.points)


def log_lines(kind, caplog, capsys):
    """The run's log as the user reads it: locally the `integration` log
    records, inside Func what the run printed (Func's task log)."""
    if kind == 'func':
        return capsys.readouterr().out.splitlines()
    return [f'[{r.levelname}] {r.getMessage()}' for r in caplog.records]


def spool_dir(tmp_path):
    return tmp_path / 'state' / 'spool' / 'datakit'


def dead_dir(tmp_path):
    return tmp_path / 'state' / 'deadletter' / 'datakit'


def spooled_lines(tmp_path):
    out = []
    for path in sorted(spool_dir(tmp_path).glob('*.json')):
        out.extend(json.loads(path.read_text())['lines'])
    return out


def files(folder):
    return sorted(folder.glob('*.json')) if folder.exists() else []


# -- item 3: which answers are bad points, which a wrong configuration -----------------------

@pytest.mark.parametrize('status,check', [
    (404, "it must be DataKit's HTTP address"),
    (405, "it must be DataKit's HTTP address"),
    (301, "it must be DataKit's HTTP address"),     # Func's helper raises only from 400 on
    (401, 'check the token and access rights'),
    (403, 'check the token and access rights'),
])
def test_a_refused_or_wrong_address_is_a_configuration_error(use, receiver, tmp_path, caplog,
                                                             capsys, status, check):
    """404, 401, 403, 405: one line saying what to check, every point spooled
    (none dead-lettered), one request for the whole run, the run fails; and a
    second run makes one request again."""
    caplog.set_level('INFO', logger='integration')
    receiver.script = [status] * 1000
    use(receiver.url)
    with pytest.raises(core.RunFailed) as info:
        core.Runner(FakeCollector(250)).run()
    assert receiver.attempts == 1
    message = str(info.value)
    assert '250 point(s) not delivered' in message and f'answered HTTP {status}' in message
    assert check in message and 'not a problem of the points' in message
    where = "connector 'datakit' in Func" if use.kind == 'func' else '--datakit or DATAKIT_URL'
    assert where in message
    errors = [line for line in log_lines(use.kind, caplog, capsys)
              if line.startswith('[ERROR]') and f'HTTP {status}' in line]
    assert len(errors) == 1, errors
    assert len(spooled_lines(tmp_path)) == 250 and files(dead_dir(tmp_path)) == []

    with pytest.raises(core.RunFailed):
        core.Runner(FakeCollector(250, prefix='j'), force=True).run()
    assert receiver.attempts == 2, 'the second run: one request (the resend), then nothing'
    assert len(spooled_lines(tmp_path)) == 500

    receiver.script = []                 # the URL or the token fixed
    summary = core.Runner(FakeCollector(1, prefix='k'), force=True).run()
    assert summary['ok']
    names = receiver.names()
    assert sorted(names) == sorted([f'i-{n}' for n in range(250)] + [f'j-{n}' for n in range(250)]
                                   + ['k-0'])


def test_bad_points_are_still_narrowed_and_dead_lettered(use, receiver, tmp_path):
    """HTTP 400, DataKit's "invalid point": halving finds the point, the rest
    is delivered, through either connector."""
    receiver.script = [('reject_names', ['i-7'])] * 20
    use(receiver.url)
    with pytest.raises(core.RunFailed) as info:
        core.Runner(FakeCollector(10)).run()
    assert sorted(receiver.names()) == sorted(f'i-{n}' for n in range(10) if n != 7)
    (dead,) = files(dead_dir(tmp_path))
    entry = json.loads(dead.read_text())
    assert [p['name'] for p in entry['points']] == ['i-7']
    assert entry['points'][0]['line'].startswith('aws_ec2,name=i-7 ')
    assert entry['status'] == 400 and 'invalidLinePoint' in entry['error']
    assert stat.S_IMODE(dead.stat().st_mode) == 0o600
    assert '1 point(s) not delivered' in str(info.value)
    assert info.value.summary['points_dead_lettered'] == 1 and not files(spool_dir(tmp_path))


class BrokenPointCollector(FakeCollector):
    broken = {'measurement': 'aws_ec2', 'tags': {'name': 'no-fields'}, 'fields': {}}

    def collect(self):
        yield from super().collect()
        yield self.broken


class SurrogatePointCollector(BrokenPointCollector):
    # A lone surrogate (never from AWS: a user's hook or extra_tags) has no UTF-8.
    broken = {'measurement': 'aws_ec2', 'tags': {'name': 'surrogate'}, 'fields': {'f': 'ops\udcff'}}


@pytest.mark.parametrize('collector, error', [(BrokenPointCollector, 'has no fields'),
                                              (SurrogatePointCollector, 'surrogate')])
def test_a_point_that_cannot_be_encoded_is_dead_lettered_not_sent(local_dff, receiver, tmp_path,
                                                                   collector, error):
    with pytest.raises(core.RunFailed) as info:
        core.Runner(collector(5)).run()
    assert sorted(receiver.names()) == [f'i-{n}' for n in range(5)]
    assert receiver.attempts == 1
    (dead,) = files(dead_dir(tmp_path))
    entry = json.loads(dead.read_text())
    assert [p['name'] for p in entry['points']] == [collector.broken['tags']['name']]
    assert error in entry['error'] and entry['points'][0]['point']['fields'] == collector.broken['fields']
    assert not files(spool_dir(tmp_path))
    assert info.value.summary['points_spooled'] == 0


@pytest.fixture
def local_dff(monkeypatch, receiver):
    dff = local_runtime.LocalDFF(datakit_url=receiver.url, sleep=no_wait)
    monkeypatch.setitem(core._RUNTIME, 'dff', dff)
    return dff


def test_funcs_connector_errors_are_classified_by_their_status():
    """Func's helper raises a plain Exception naming the status in its text."""
    DataKit = func_datakit_class()
    for status, kind in ((400, 'points'), (413, 'points'), (404, 'config'), (401, 'config'),
                         (403, 'config'), (429, 'transient'), (500, 'transient'), (503, 'transient')):
        receiver = DataKitReceiver(script=[status])
        try:
            client = DataKit(host='127.0.0.1', port=int(receiver.url.rsplit(':', 1)[1]))
            with pytest.raises(Exception) as info:
                client.write_by_category_many('custom_object', [
                    {'measurement': 'm', 'tags': {'name': 'a'}, 'fields': {'f': 1}}])
        finally:
            receiver.stop()
        error = core._as_datakit_error(info.value)
        assert (error.status, error.kind) == (status, kind)
    client = DataKit(host='127.0.0.1', port=9)
    with pytest.raises(Exception) as info:
        client.write_by_category_many('custom_object', [
            {'measurement': 'm', 'tags': {'name': 'a'}, 'fields': {'f': 1}}])
    assert core._as_datakit_error(info.value).kind == 'transient'


# -- item 9: the spool holds line protocol; replay is byte-identical, each point once --------

UTC = datetime.timezone.utc


def awkward_points():
    """Values that JSON cannot carry as they are: datetimes (as timestamp and
    field), a dict field, big ints, floats, booleans, unicode, quotes."""
    return [
        {'measurement': 'aws_ec2', 'tags': {'name': 'i-dt', 'zone': 'a b,c=d'},
         'timestamp': datetime.datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=UTC),
         'fields': {'LaunchTime': datetime.datetime(2021, 10, 26, 7, 0, 44, tzinfo=UTC),
                    'cpu': 2, 'big': 2 ** 62, 'ratio': 0.1, 'on': True,
                    'Placement': {'AvailabilityZone': 'cn-northwest-1a', 'Tenancy': 'default'},
                    'message': 'quote " backslash \\ unicode ☃ 中文'}},
        {'measurement': 'aws_ec2', 'tags': {'name': 'i-ns'}, 'timestamp': 1700000000123456789,
         'fields': {'f': 1.5, 'text': 'line one\nline two'}},
    ]


def test_replay_is_byte_identical_and_parses(use, receiver, influx, tmp_path):
    """What a healthy DataKit gets the first time, and what it gets when the
    point was spooled and sent by the next run, are the same bytes, and
    InfluxDB reads them as the original values. Through our client and
    through Func's helper alike."""
    points = awkward_points()
    expected = [core.to_line_protocol(p) for p in points]

    use(receiver.url)
    core.Runner(PointsCollector(points), force=True).run()
    first = '\n'.join(receiver.bodies)
    assert first == '\n'.join(expected)

    use(DOWN)
    with pytest.raises(core.RunFailed):
        core.Runner(PointsCollector(points), force=True).run()
    assert spooled_lines(tmp_path) == expected

    replay = DataKitReceiver()
    try:
        use(replay.url)
        core.Runner(PointsCollector([]), force=True).run()
        replayed = '\n'.join(replay.bodies)
    finally:
        replay.stop()
    assert replayed == first, 'a replay sends the bytes of the first attempt'
    assert not files(spool_dir(tmp_path)) and not files(dead_dir(tmp_path))

    status, error = influx.write(replayed)
    assert status == 204, error
    rows = {row['name']: row for row in influx.rows('aws_ec2')}
    row = rows['i-dt']
    assert row['time'] == core._lp_timestamp(points[0]['timestamp'])
    assert row['cpu'] == 2 and row['big'] == 2 ** 62 and row['ratio'] == 0.1 and row['on'] is True
    assert row['zone'] == 'a b,c=d' and row['message'] == points[0]['fields']['message']
    assert json.loads(row['Placement']) == points[0]['fields']['Placement']
    assert rows['i-ns']['time'] == 1700000000123456789 and rows['i-ns']['text'] == 'line one\nline two'


def test_funcs_helper_gets_our_bytes_for_every_write(monkeypatch, receiver):
    """Inside Func the points go through the helper's own request method with
    our line protocol: the same bytes as locally, and the same query."""
    monkeypatch.setattr(core, 'DFF', FuncDFF(receiver.url), raising=False)
    core.Runner(PointsCollector(awkward_points()), force=True).run()
    assert receiver.bodies == ['\n'.join(core.to_line_protocol(p) for p in awkward_points())]
    path, query, headers, _ = receiver.requests[0]
    assert path == '/v1/write/custom_object' and query == {'input': 'datakit-python-sdk'}
    assert headers['Content-Type'] == 'text/plain'


def reject_i70():
    return ('reject_names', ['i-70'])


def test_a_5xx_after_a_partial_success_spools_only_what_was_not_accepted(use, receiver, tmp_path):
    """A batch with a bad point is halved; the first half is accepted, then
    DataKit fails (500). Only the points not yet accepted are spooled; a run
    whose resend is cut short the same way keeps only what it did not send;
    in the end every point arrives exactly once and the bad one is a dead letter."""
    failures = [500] * 4                 # our client retries a 5xx 3 times; Func's not at all
    receiver.script = [reject_i70(), reject_i70()] + failures
    use(receiver.url)
    with pytest.raises(core.RunFailed):
        core.Runner(FakeCollector(100)).run()
    assert sorted(receiver.names()) == sorted(f'i-{n}' for n in range(50))
    assert len(spooled_lines(tmp_path)) == 50
    assert {core._line_name(line) for line in spooled_lines(tmp_path)} == {
        f'i-{n}' for n in range(50, 100)}

    # The resend: 50..99 refused, 50..74 refused, 50..61 accepted, 62..74 fails.
    receiver.script = [reject_i70()] * 3 + failures
    delivery = core.Delivery(connector(use.kind, receiver.url), 'datakit')
    delivery.resend_spool()
    assert delivery.failed_points == 38 and delivery.down
    assert {core._line_name(line) for line in spooled_lines(tmp_path)} == {
        f'i-{n}' for n in range(62, 100)}

    receiver.script = [reject_i70()] * 100
    delivery = core.Delivery(connector(use.kind, receiver.url), 'datakit')
    delivery.resend_spool()
    names = receiver.names()
    assert sorted(names) == sorted(f'i-{n}' for n in range(100) if n != 70), 'each point once'
    assert not files(spool_dir(tmp_path))
    (dead,) = files(dead_dir(tmp_path))
    assert [p['name'] for p in json.loads(dead.read_text())['points']] == ['i-70']


def test_a_batch_an_earlier_version_spooled_is_still_delivered(local_dff, receiver, tmp_path):
    folder = spool_dir(tmp_path)
    folder.mkdir(parents=True)
    (folder / f'{time.time_ns() - 10 ** 9}-abcdef12.json').write_text(json.dumps({
        'category': 'custom_object',
        'points': [{'measurement': 'aws_ec2', 'tags': {'name': f'old-{n}'}, 'fields': {'f': n},
                    'timestamp': 1700000000000000000} for n in range(3)]}))
    core.Runner(FakeCollector(2), force=True).run()
    assert receiver.names() == ['old-0', 'old-1', 'old-2', 'i-0', 'i-1']
    assert not files(folder)


# -- item 10: the spool is bounded ------------------------------------------------------------

def snapshot(prefix, count):
    return [{'measurement': 'aws_ec2', 'tags': {'name': f'{prefix}-{n}'},
             'fields': {'message': 'x' * 200}, 'timestamp': 1700000000000000000 + n}
            for n in range(count)]


def metric(prefix, count):
    return [{'measurement': 'aws_AWS/EC2', 'tags': {'InstanceId': f'{prefix}-{n}'},
             'fields': {'CPUUtilization_Average': 1.5}, 'timestamp': 1700000000000000000 + n}
            for n in range(count)]


def test_a_newer_object_snapshot_supersedes_the_spooled_one(receiver, tmp_path, caplog):
    """While DataKit is down, each run spools the estate again: only the newest
    snapshot of each object collector is kept; metrics keep every point."""
    caplog.set_level('INFO', logger='integration')
    for run in range(1, 4):
        delivery = core.Delivery(connector('local', DOWN), 'datakit')
        delivery.resend_spool()
        for batch in range(3):
            delivery.write('custom_object', snapshot(f'a{run}b{batch}', 100), collector='ec2:account-a')
        delivery.write('custom_object', snapshot(f'b{run}', 10), collector='ec2:account-b')
        delivery.write('metric', metric(f'm{run}', 5), collector='ec2:account-a')
    assert 'dropped 3 spooled batch(es) (300 point(s)' in caplog.text
    assert "superseded by this run's custom_object snapshot of the same collector" in caplog.text
    assert len(files(spool_dir(tmp_path))) == 3 + 1 + 3

    delivery = core.Delivery(connector('local', receiver.url), 'datakit')
    delivery.resend_spool()
    expected = ([f'a3b{b}-{n}' for b in range(3) for n in range(100)] + [f'b3-{n}' for n in range(10)])
    assert sorted(receiver.names()) == sorted(expected)
    metrics = [line for line in receiver.lines if line.startswith('aws_AWS/EC2')]
    assert len(metrics) == 15
    assert not files(spool_dir(tmp_path))


def test_the_spool_is_capped_by_size_oldest_first(monkeypatch, receiver, tmp_path, caplog):
    monkeypatch.setenv('INTEGRATION_SPOOL_MAX_MB', '0.05')      # 52 KB
    caplog.set_level('INFO', logger='integration')
    for run in range(20):
        delivery = core.Delivery(connector('local', DOWN), 'datakit')
        delivery.write('metric', [dict(p, fields={'message': 'y' * 500}) for p in metric(f'r{run}', 10)])
    total = sum(p.stat().st_size for p in files(spool_dir(tmp_path)))
    assert 0 < total <= 0.05 * 2 ** 20
    assert 'over the 0.05 MiB limit (INTEGRATION_SPOOL_MAX_MB), oldest first' in caplog.text
    core.Delivery(connector('local', receiver.url), 'datakit').resend_spool()
    prefixes = {name.split('-')[0] for name in (line.split('InstanceId=')[1].split(' ')[0]
                                                for line in receiver.lines)}
    assert 'r19' in prefixes and 'r0' not in prefixes


def test_old_spool_and_dead_letters_are_dropped(receiver, tmp_path, caplog):
    caplog.set_level('INFO', logger='integration')
    start = 1_800_000_000.0
    then = core.Delivery(connector('local', DOWN), 'datakit', clock=lambda: start)
    then.write('metric', metric('old', 5))
    then.spool.dead_letter('metric', [{'name': 'x', 'line': 'm f=1'}], core.DataKitError(400, 'bad'),
                           start)
    week = core.Delivery(connector('local', receiver.url), 'datakit',
                         clock=lambda: start + 6 * 86400)
    week.spool.prune(start + 6 * 86400)
    assert len(files(spool_dir(tmp_path))) == 1 and len(files(dead_dir(tmp_path))) == 1
    later = core.Delivery(connector('local', receiver.url), 'datakit',
                          clock=lambda: start + 8 * 86400)
    later.resend_spool()
    assert receiver.attempts == 0 and not files(spool_dir(tmp_path))
    assert 'dropped 1 spooled batch(es) (5 point(s)' in caplog.text
    assert 'older than 7 day(s) (INTEGRATION_SPOOL_MAX_DAYS)' in caplog.text
    assert len(files(dead_dir(tmp_path))) == 1
    core.Delivery(connector('local', receiver.url), 'datakit',
                  clock=lambda: start + 31 * 86400).resend_spool()
    assert not files(dead_dir(tmp_path))
    assert 'older than 30 day(s) (INTEGRATION_DEADLETTER_MAX_DAYS)' in caplog.text


@pytest.mark.parametrize('name,value', [('INTEGRATION_SPOOL_MAX_MB', 'lots'),
                                        ('INTEGRATION_DEADLETTER_MAX_DAYS', '0')])
def test_a_bad_limit_is_one_line(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    with pytest.raises(core.ConfigError) as info:
        core.Spool('datakit')
    assert str(info.value).startswith(f'{name}={value!r}: must be a number of ')


# -- item 11: the state directory must be ours ------------------------------------------------

NOBODY = 65534

STARTUP_SCRIPT = '''
from integration_core__runner import Runner


class Collector:
    title = 'Fake'
    category = 'custom_object'
    state_key = 'fake:planted-test'

    def identity(self):
        return {'method': 'access_key', 'account_id': '123456789012',
                'arn': 'arn:aws:iam::123456789012:user/fake', 'partition': 'aws'}

    def collect(self):
        yield {'measurement': 'aws_ec2', 'tags': {'name': 'fresh'}, 'fields': {'f': 1}}


@DFF.API('Fake Collection', timeout=60)
def run():
    Runner(Collector()).run()
'''


def plant(folder, owner=NOBODY, mode=0o700):
    """A state directory someone else made, with a spooled batch in it."""
    batch = folder / 'spool' / 'datakit'
    batch.mkdir(parents=True)
    planted = batch / '1700000000000000000-abcdef12.json'    # as any version would send it
    planted.write_text(json.dumps({
        'category': 'custom_object', 'lines': ['aws_ec2,name=planted f=1i'],
        'points': [{'measurement': 'aws_ec2', 'tags': {'name': 'planted'}, 'fields': {'f': 1}}]}))
    os.chown(planted, owner, owner)
    for path in (folder, folder / 'spool', batch):
        os.chown(path, owner, owner)
        os.chmod(path, mode)


@pytest.fixture
def unwritable_home(tmp_path, monkeypatch):
    """HOME that cannot hold ~/.cache (a file), the temporary folder in tmp_path."""
    home = tmp_path / 'home-is-a-file'
    home.write_text('')
    tmp = tmp_path / 'tmp'
    tmp.mkdir(mode=0o1777)
    os.chmod(tmp, 0o1777)
    monkeypatch.delenv('INTEGRATION_STATE_DIR', raising=False)
    monkeypatch.setenv('HOME', str(home))
    monkeypatch.setenv('TMPDIR', str(tmp))
    monkeypatch.setattr('tempfile.tempdir', None)
    return tmp / f'dataflux-integration-{os.getuid()}'


@pytest.mark.skipif(os.getuid() != 0, reason='needs root to give a folder to another user')
def test_a_planted_fallback_state_dir_is_refused_and_nothing_is_sent(unwritable_home, receiver,
                                                                     tmp_path):
    plant(unwritable_home)
    script = tmp_path / 'startup.py'
    script.write_text(STARTUP_SCRIPT)
    result = subprocess.run([sys.executable, '-m', 'integration_core__runner', 'run', str(script),
                             '--datakit', receiver.url], capture_output=True, text=True, cwd=ROOT,
                            timeout=120, env=dict(os.environ))
    assert receiver.attempts == 0, 'nothing may be sent, the planted batch least of all'
    assert result.returncode == 2, result.stdout + result.stderr
    (line,) = [l for l in result.stderr.splitlines() if l.strip()]
    assert line.startswith(f'error: refusing the state directory {unwritable_home} ')
    assert f'belongs to uid {NOBODY}, not to this user (uid {os.getuid()})' in line
    assert 'set INTEGRATION_STATE_DIR' in line
    assert 'Traceback' not in result.stdout + result.stderr


def test_the_fallback_state_dir_is_made_private_and_then_used(unwritable_home):
    assert core.state_dir() == str(unwritable_home)
    info = os.lstat(unwritable_home)
    assert stat.S_ISDIR(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o700
    assert info.st_uid == os.getuid()
    assert core.state_dir() == str(unwritable_home)          # ours: accepted the next time


@pytest.mark.parametrize('make,problem', [
    (lambda path, tmp: os.symlink(tmp, path), 'is a symbolic link'),
    (lambda path, tmp: os.mkdir(path, 0o755) or os.chmod(path, 0o755), 'has mode 0755'),
    (lambda path, tmp: path.write_text('x'), 'is not a directory'),
])
def test_a_fallback_state_dir_not_private_is_refused(unwritable_home, tmp_path, make, problem):
    target = tmp_path / 'elsewhere'
    target.mkdir(mode=0o700)
    make(unwritable_home, target)
    with pytest.raises(core.ConfigError) as info:
        core.state_dir()
    assert problem in str(info.value) and 'set INTEGRATION_STATE_DIR' in str(info.value)


@pytest.mark.skipif(os.getuid() != 0, reason='needs root to give a folder to another user')
def test_a_configured_state_dir_of_another_user_is_refused(monkeypatch, tmp_path, receiver):
    folder = tmp_path / 'theirs'
    folder.mkdir()
    plant(folder, mode=0o755)
    monkeypatch.setenv('INTEGRATION_STATE_DIR', str(folder))
    monkeypatch.setitem(core._RUNTIME, 'dff', local_runtime.LocalDFF(datakit_url=receiver.url,
                                                                     cache=core.MemoryCache()))
    with pytest.raises(core.ConfigError) as info:
        core.Runner(FakeCollector(1)).run()
    assert f'belongs to uid {NOBODY}' in str(info.value)
    assert '(INTEGRATION_STATE_DIR)' in str(info.value) and 'mode 0700' in str(info.value)
    assert receiver.attempts == 0


def test_a_configured_state_dir_others_can_write_is_refused(monkeypatch, tmp_path):
    folder = tmp_path / 'open'
    folder.mkdir()
    os.chmod(folder, 0o777)
    monkeypatch.setenv('INTEGRATION_STATE_DIR', str(folder))
    with pytest.raises(core.ConfigError) as info:
        core.state_dir()
    assert 'has mode 0777: other users can write to it' in str(info.value)
    os.chmod(folder, 0o750)              # readable by the group is fine: not writable
    assert core.state_dir() == str(folder)


def test_spooled_points_are_synced_to_the_disk_cache_entries_are_not(monkeypatch, tmp_path, receiver):
    """Points that DataKit did not take survive a power loss (each spool file
    is synced before its rename, and its folder after it); the local
    DFF.CACHE, like Func's Redis, is not synced at each write."""
    import integration_local.runtime as local_runtime
    synced = []
    fsync = os.fsync
    monkeypatch.setattr(os, 'fsync', lambda fd: (synced.append(os.readlink(f'/proc/self/fd/{fd}')), fsync(fd)))
    core.Delivery(connector('local', DOWN), 'datakit').write('metric', metric('s', 3))
    # The batch's file, then its folder (the rename).
    assert [os.path.dirname(synced[0]), synced[1]] == [str(spool_dir(tmp_path))] * 2 and len(synced) == 2
    synced.clear()
    # Sent: its removal is synced too (a batch back after a power loss would be sent twice).
    core.Delivery(connector('local', receiver.url), 'datakit').resend_spool()
    assert files(spool_dir(tmp_path)) == [] and len(receiver.lines) == 3
    assert synced == [str(spool_dir(tmp_path))]
    synced.clear()
    cache = local_runtime.FileCache(str(tmp_path))
    cache.set('skip-record', '{"started": 1}', expires=900)
    assert synced == [] and cache.get('skip-record') == '{"started": 1}'
