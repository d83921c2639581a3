"""Fixtures of the tier that runs our modules inside the real DataFlux Func
worker (tests/functier/harness.py).

Func's source is $FUNC_SRC or ../shared/dataflux-func beside the repository.
Without it, every test here is skipped with one line saying so; with
CI=true, a missing Func or a failed setup fails them instead.

The fixtures of tests/conftest.py apply here too (emulator, aws, seed_estate,
clean_env, network_guard); the Func worker is another process, so what it
must see (AWS_ENDPOINT_URL, the IMDS address ...) is passed to it explicitly
through `func.set_process_env(...)`.
"""
import os
import subprocess

import pytest

from .harness import FuncTierError, FuncWorker, locate_func_src

HERE = os.path.dirname(os.path.abspath(__file__))
IN_CI = os.environ.get('CI', '').lower() == 'true'

# What every test starts from: the worker's process environment for AWS.
BASE_PROCESS_ENV = {
    'AWS_ENDPOINT_URL': None, 'AWS_ENDPOINT_URL_EC2': None, 'AWS_ENDPOINT_URL_STS': None,
    'AWS_EC2_METADATA_SERVICE_ENDPOINT': 'http://127.0.0.1:9', 'AWS_METADATA_SERVICE_TIMEOUT': '1',
    'AWS_ACCESS_KEY_ID': None, 'AWS_SECRET_ACCESS_KEY': None, 'AWS_SESSION_TOKEN': None,
    'AWS_PROFILE': None, 'AWS_DEFAULT_REGION': None, 'AWS_REGION': None,
    'INTEGRATION_FORCE': None, 'INTEGRATION_STATE_DIR': None, 'DATAKIT_URL': None,
}


FUNC_SRC, MISSING = locate_func_src()


def _unavailable(reason):
    """Skip here; fail in CI, where the tier must run."""
    if IN_CI:
        pytest.fail(f'Func tier (CI=true): {reason}', pytrace=False)
    pytest.skip(f'Func tier: {reason}')


@pytest.fixture(scope='session')
def func_src():
    if MISSING:
        _unavailable(MISSING)       # CI: every test of the tier fails with this line
    return FUNC_SRC


@pytest.fixture(scope='session')
def func_worker(func_src, tmp_path_factory):
    """One Func worker (and its Redis and MariaDB) for the whole session."""
    env = dict(os.environ, FUNC_SRC=func_src)
    done = subprocess.run(['bash', os.path.join(HERE, 'setup.sh')], env=env,
                          capture_output=True, text=True, timeout=900)
    if done.returncode:
        lines = (done.stderr.strip() or done.stdout.strip() or 'no output').splitlines()
        _unavailable(f'tests/functier/setup.sh failed: {lines[-1]}')
    worker = FuncWorker(func_src, workdir=str(tmp_path_factory.mktemp('func')))
    try:
        worker.start()
    except FuncTierError as e:
        _unavailable(f'the Func worker did not start: {str(e).splitlines()[0]}')
    yield worker
    worker.stop()


@pytest.fixture(scope='session')
def module_publishes(func_worker):
    """Each module of the README's paste table published in the table's
    order, as a user pastes them: {script id: TaskResult}."""
    return func_worker.publish_project_modules(check=False)


@pytest.fixture
def func(func_worker):
    """The session's worker, reset for one test: no DFF.CACHE entries, an
    empty home (no spool), no INTEGRATION_FORCE variable, no DataKit
    connector, AWS environment off."""
    if func_worker.driver is None:          # a previous test killed a hung worker
        func_worker.restart_worker()
    func_worker.clear_cache()
    func_worker.reset_home()
    func_worker.set_env('INTEGRATION_FORCE', None)
    func_worker.delete_connector('datakit')
    func_worker.set_process_env(**BASE_PROCESS_ENV)
    yield func_worker


@pytest.fixture
def modules(func, module_publishes):
    """The project's modules are published; a test that needs them fails with
    Func's own pre-check error when one is not."""
    for script_id, outcome in module_publishes.items():
        if outcome.status != 'success':
            pytest.fail(f'{script_id} does not publish in Func ({outcome.status}): {outcome.exception}\n'
                        f'{outcome.traceback or ""}', pytrace=False)
    return func
