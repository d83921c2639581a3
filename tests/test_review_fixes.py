"""Defects an independent review reproduced, each pinned: answers that are
not DataKit's, the schedule's trigger time, `python -m` beside a script named
like a library module, typed INTEGRATION_FORCE values, the skip record of
another DataKit."""
import os
import subprocess
import sys

import pytest

import integration_core__runner as core
import integration_local.runtime as local_runtime
from servers import DataKitReceiver
from test_runner import FakeCollector, no_wait

NGINX_400 = ('<html><head><title>400 The plain HTTP request was sent to HTTPS port</title></head>'
             '<body><center><h1>400 Bad Request</h1></center></body></html>')


@pytest.mark.parametrize('answer,says', [
    (('raw', 400, NGINX_400, {'Content-Type': 'text/html'}), 'HTTP 400'),
    (('raw', 301, '', {'Location': 'http://127.0.0.1:9/elsewhere'}), 'HTTP 301'),
    (('raw', 302, '', {'Location': '/v1/write/custom_object'}), 'HTTP 302'),
])
def test_an_answer_that_is_not_datakits_is_a_configuration_error(answer, says, tmp_path):
    """A web server's 400 page or a redirect is not DataKit judging points:
    nothing is dead-lettered, the points wait in the spool, the run fails."""
    receiver = DataKitReceiver(script=[answer] * 20)
    try:
        local_runtime.install(local_runtime.LocalDFF(datakit_url=receiver.url, sleep=no_wait))
        with pytest.raises(core.RunFailed) as info:
            core.Runner(FakeCollector(150), force=True).run()
    finally:
        receiver.stop()
    assert says in str(info.value) and '150 point(s) not delivered' in str(info.value)
    assert receiver.attempts <= 3 and receiver.lines == []
    state = tmp_path / 'state'
    assert not (state / 'deadletter').exists() or not list((state / 'deadletter').rglob('*.json'))
    assert list((state / 'spool').rglob('*.json'))


def test_the_schedule_counts_from_the_tick_not_from_when_the_task_got_going(monkeypatch):
    """Func passes the tick's time (_DFF_TRIGGER_TIME): a task Func started
    three minutes late, or a second collector that waited for the first, does
    not make the next tick look early."""
    local_runtime.install(local_runtime.LocalDFF(output=local_runtime.LineProtocolWriter(open(os.devnull, 'w'), 'null')))
    tick = 1_800_000_000
    first, second = FakeCollector(2, state_key='a'), FakeCollector(2, state_key='b')
    monkeypatch.setitem(core._RUNTIME, 'trigger_time', tick)             # started 180 s late
    core.Runner([first, second]).run()
    monkeypatch.setitem(core._RUNTIME, 'trigger_time', tick + 900)       # the next tick, on time
    summary = core.Runner([first, second]).run()
    assert [c['status'] for c in summary['collectors']] == ['ok', 'ok']
    monkeypatch.setitem(core._RUNTIME, 'trigger_time', tick + 900 + 240)  # a manual run
    summary = core.Runner([first, second]).run()
    assert [c['status'] for c in summary['collectors']] == ['skipped', 'skipped']


@pytest.mark.parametrize('name', ['org.py', 'secrets.py'])
def test_python_m_beside_a_script_named_like_a_library_module(name, tmp_path, seed_estate, write_script):
    path = write_script('1_iam_user.py', seed_estate, filename=name)
    result = subprocess.run([sys.executable, '-m', 'integration_core__runner', 'run', path,
                             '--output', '-', '--force'], capture_output=True, text=True,
                            cwd=os.path.dirname(path), timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "name 'DFF' is not defined" not in result.stdout + result.stderr
    assert set(seed_estate['ids']) <= {line.split('name=')[1].split(',')[0].split(' ')[0]
                                       for line in result.stdout.splitlines() if 'name=' in line}


@pytest.mark.parametrize('value,forced', [
    (True, True), (False, False), (1, True), (0, False), (-1, False), (2.5, True),
    ('true', True), ('0', False), (['0'], False), (['1'], True), ([], False), (None, False),
    ({'a': 1}, False),
])
def test_integration_force_as_func_types_it(value, forced):
    assert core._truthy(value) is forced


def test_the_skip_record_is_per_datakit_url():
    a, b = DataKitReceiver(), DataKitReceiver()
    try:
        for receiver in (a, b):
            local_runtime.install(local_runtime.LocalDFF(datakit_url=receiver.url, sleep=no_wait))
            summary = core.Runner(FakeCollector(3, state_key='same')).run()
            assert summary['collectors'][0]['status'] == 'ok'
        assert len(a.lines) == len(b.lines) == 3
    finally:
        a.stop()
        b.stop()


def test_a_time_field_is_text_and_a_decimal_a_number_through_influxdb(influx):
    import datetime
    import decimal
    point = {'measurement': 'typed', 'tags': {'name': 'i-typed'}, 'timestamp': 1700000000000000000,
             'fields': {'seen': datetime.datetime(2021, 10, 26, 7, 0, 44, tzinfo=datetime.timezone.utc),
                        'ratio': decimal.Decimal('1.5')}}
    status, error = influx.write(core.to_line_protocol(point))
    assert status == 204, error
    (row,) = influx.rows('typed')
    assert row['seen'] == '2021-10-26T07:00:44+00:00' and row['ratio'] == 1.5
