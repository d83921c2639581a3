"""The harness itself, with small scripts of our own: what Func's worker does
with a published script, so that a failure in test_in_func.py is about our
modules, not about the harness. Each test also pins down a Func behaviour
the module authors rely on."""
import textwrap

import pytest

from .harness import PublishFailed, skip_tier_if_func_missing

skip_tier_if_func_missing()

HELLO = textwrap.dedent('''\
    import sys
    print('module body runs')

    @DFF.API('Hello', timeout=5, fixed_crontab='*/15 * * * *')
    def run(name='world'):
        print('hello', name, DFF.CACHE.get('count'))
        DFF.CACHE.set('count', int(DFF.CACHE.get('count') or 0) + 1, expire=60)
        sys.stdout.write('to the worker stdout\\n')
        return {'greeted': name}
    ''')


def test_publish_and_run_in_one_worker_process(func):
    published = func.publish('functier_demo__hello', HELLO)
    assert published.status == 'success'
    assert published.messages == ['module body runs']          # the body runs at publish
    assert [f['name'] for f in published.api_funcs] == ['run']
    assert published.api_funcs[0]['extraConfig'] == {'timeout': 5, 'fixedCronExpr': '*/15 * * * *'}

    first = func.run('functier_demo__hello.run', kwargs={'name': 'func'})
    second = func.run('functier_demo__hello.run')
    assert first.status == second.status == 'success', first
    assert first.timeout == 5                                  # from DFF.API(timeout=...)
    assert first.result == {'greeted': 'func'}
    # Each task runs the module body again; print lines carry Func's prefix.
    assert first.messages == ['module body runs', 'hello func None']
    assert second.messages == ['module body runs', 'hello world 1']
    assert first.print_log[1].endswith('] hello func None') and first.print_log[1].startswith('[')
    # sys.stdout is not the task log.
    assert 'to the worker stdout' in first.worker_stdout
    assert not any('worker stdout' in line for line in first.print_log)
    # DFF.CACHE: scope = the script id; values come back as text.
    assert func.cache('functier_demo__hello') == {'count': '2'}
    assert 0 < func.cache_entries('functier_demo__hello')['functier_demo__hello']['count']['ttl'] <= 60
    assert first.threads_alive == [] and first.blocked_hosts == []


def test_republish_is_seen_by_the_next_task(func):
    func.publish('functier_demo__version', '@DFF.API("v")\ndef run():\n    return 1\n')
    assert func.run('functier_demo__version.run').result == 1
    func.publish('functier_demo__version', '@DFF.API("v")\ndef run():\n    return 2\n')
    assert func.run('functier_demo__version.run').result == 2


def test_a_failing_pre_check_does_not_publish(func):
    func.publish('functier_demo__broken', '@DFF.API("b")\ndef run():\n    return "old"\n')
    with pytest.raises(PublishFailed) as failed:
        func.publish('functier_demo__broken', 'class Stop(BaseException):\n    pass\n')
    assert failed.value.outcome.status == 'failure'
    assert "name 'BaseException' is not defined" in failed.value.outcome.exception
    assert func.run('functier_demo__broken.run').result == 'old'


def test_imports_by_script_id_only(func):
    func.publish('functier_lib__util', 'VALUE = 7\nprint("util body")\n')
    func.publish('functier_demo__user', textwrap.dedent('''\
        import functier_lib__util as util
        from functier_lib__util import VALUE
        @DFF.API('uses util')
        def run():
            try:
                import functier_lib_util
            except ImportError as e:
                print('plain name:', type(e).__name__)
            return util.VALUE + VALUE
        '''))
    r = func.run('functier_demo__user.run')
    assert r.status == 'success', r
    assert r.result == 14
    assert r.messages == ['util body', 'plain name: ModuleNotFoundError']


def test_env_variables_connector_and_failure(func):
    func.publish('functier_demo__env', textwrap.dedent('''\
        @DFF.API('env')
        def run():
            print('FLAG', repr(DFF.ENV('FUNCTIER_FLAG')))
            dk = DFF.SRC('datakit')
            print('datakit', dk.client.host, dk.client.port)
            raise ValueError('one clear line')
        '''))
    func.set_env('FUNCTIER_FLAG', '1')
    func.set_datakit('http://127.0.0.1:9')
    r = func.run('functier_demo__env.run')
    assert r.status == 'failure'
    assert r.exception == 'one clear line' and r.exception_type == 'ValueError'
    assert r.messages == ["FLAG '1'", 'datakit 127.0.0.1 9']
    assert 'raise ValueError' in r.traceback
    func.set_env('FUNCTIER_FLAG', 'true', auto_type_casting='boolean')
    assert func.run('functier_demo__env.run').messages[0] == 'FLAG True'
    func.set_env('FUNCTIER_FLAG', None)
    assert func.run('functier_demo__env.run').messages[0] == 'FLAG None'


def test_timeout_and_thread_report(func):
    func.publish('functier_demo__slow', textwrap.dedent('''\
        import threading, time
        @DFF.API('slow', timeout=2)
        def run():
            stop = threading.Event()
            threading.Thread(target=stop.wait, args=(4,), name='functier-left-behind', daemon=True).start()
            try:
                time.sleep(30)
            except Exception:
                print('never: TaskTimeout is a BaseException')
        '''))
    r = func.run('functier_demo__slow.run', thread_grace=0.5)
    assert r.status == 'timeout', r
    assert 2 <= r.wall < 5
    assert r.exception.startswith('Task execution takes too much time')
    assert [t['name'] for t in r.threads_alive] == ['functier-left-behind']
    # The worker is still usable afterwards.
    assert func.run('functier_demo__slow.run', timeout=1, thread_grace=5).threads_alive == []
