"""The real DataFlux Func worker, for tests: private Redis and MariaDB on
loopback, Func's schema loaded unchanged, and ONE long-lived worker process
(tests/functier/driver.py under Func's Python 3.8) that publishes scripts and
runs their functions as cron-tick tasks, the way Func's server and worker do.

    func = FuncWorker(func_src, venv, workdir, env={...}).start()
    func.publish_project_modules()                 # the README's paste table
    func.set_datakit('http://127.0.0.1:9529')
    func.publish('my_aws__start', code)            # raises PublishFailed
    r = func.run('my_aws__start.run', timeout=5)   # a TaskResult
    r.status, r.messages, r.exception, r.traceback, r.wall, r.threads_alive
    func.cache()                                   # {scope: {key: value}}
    func.stop()

Nothing here reaches past 127.0.0.1; every process it starts is its own and
is stopped by stop().
"""
import dataclasses
import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
DRIVER = os.path.join(HERE, 'driver.py')
DEFAULT_VENV = os.environ.get('FUNC_VENV') or os.path.join(ROOT, '.func-venv')


def locate_func_src():
    """Func's source: $FUNC_SRC, else ../shared/dataflux-func beside the repo.
    Returns (path or None, what is missing or None)."""
    path = os.environ.get('FUNC_SRC') or os.path.normpath(os.path.join(ROOT, '..', 'shared', 'dataflux-func'))
    if os.path.isfile(os.path.join(path, 'worker', 'app.py')):
        return os.path.abspath(path), None
    return None, f'DataFlux Func source not found at {path} (set FUNC_SRC)'


def skip_tier_if_func_missing():
    """Called at the top of each test module of the tier: without Func's
    source every test is skipped, reported as ONE line (same place, same
    reason). With CI=true nothing is skipped: the fixtures fail instead."""
    _, missing = locate_func_src()
    if missing and os.environ.get('CI', '').lower() != 'true':
        import pytest
        pytest.skip(f'Func tier: {missing}', allow_module_level=True)


class FuncTierError(RuntimeError):
    """The harness could not do what was asked (not a task outcome)."""


class PublishFailed(FuncTierError):
    """Func's pre-check refused the script, as the editor would show it."""

    def __init__(self, script_id, outcome):
        self.script_id = script_id
        self.outcome = outcome
        super().__init__(f'publishing {script_id} failed ({outcome.status}): {outcome.exception}\n'
                         f'{outcome.traceback or ""}\nprint log:\n' + '\n'.join(outcome.print_log))


@dataclasses.dataclass
class TaskResult:
    """What one task (a publish pre-check or a function run) ended with."""
    status: str                  # success | failure | timeout | skip | driver-error ...
    result: object = None        # the function's return value
    exception: str = None        # Func's exception text (str(e) or the type name)
    exception_type: str = None
    traceback: str = None        # Func's traceback (user-script frames for failures)
    print_log: list = dataclasses.field(default_factory=list)   # the task log, as Func shows it
    messages: list = dataclasses.field(default_factory=list)    # the same lines without Func's prefix
    wall: float = 0.0            # seconds the task took in the worker
    cpu: float = 0.0             # CPU seconds of the worker process meanwhile (all threads)
    threads_at_end: list = dataclasses.field(default_factory=list)   # new threads alive at the end
    threads_alive: list = dataclasses.field(default_factory=list)    # ... still alive after thread_grace
    thread_grace: float = 0.0
    blocked_hosts: list = dataclasses.field(default_factory=list)    # non-loopback hosts tried
    worker_stdout: str = ''      # what went to the worker's stdout/stderr (not the task log)
    driver_error: str = None
    api_funcs: list = dataclasses.field(default_factory=list)        # publish only
    publish_version: int = None
    task_id: str = None
    timeout: int = None

    @property
    def text(self):
        """Everything a user can read about the task: log, exception, traceback."""
        return '\n'.join(self.print_log + [self.exception or '', self.traceback or ''])

    def __str__(self):
        return (f'status={self.status} wall={self.wall}s exception={self.exception!r}\n'
                f'--- print log\n' + '\n'.join(self.print_log)
                + f'\n--- traceback\n{self.traceback or ""}'
                + (f'\n--- worker stdout\n{self.worker_stdout[-3000:]}' if self.worker_stdout else ''))


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _wait_port(port, proc, what, log_path, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise FuncTierError(f'{what} exited with {proc.returncode}: {_tail(log_path)}')
        try:
            with socket.create_connection(('127.0.0.1', port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise FuncTierError(f'{what} did not listen on 127.0.0.1:{port} within {timeout} s: {_tail(log_path)}')


def _tail(path, n=2000):
    try:
        with open(path, 'rb') as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - n))
            return f.read().decode('utf-8', 'replace')
    except OSError:
        return '(no log)'


def _stop(proc, timeout=10):
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout)


def _which(name, *extra_dirs):
    found = shutil.which(name)
    if found:
        return found
    for d in extra_dirs:
        if os.access(os.path.join(d, name), os.X_OK):
            return os.path.join(d, name)
    return None


class FuncWorker:
    """Redis + MariaDB + one Func worker process. See the module docstring."""

    def __init__(self, func_src, venv=None, workdir=None, env=None):
        self.func_src = os.path.abspath(func_src)
        self.venv = venv or DEFAULT_VENV
        self.python = os.path.join(self.venv, 'bin', 'python')
        self._own_workdir = workdir is None
        self.workdir = workdir or tempfile.mkdtemp(prefix='functier-')
        self.env = dict(env or {})
        self.redis = self.mariadb = self.driver = None
        self.redis_port = self.mysql_port = None
        self._replies = None
        self.worker_stdout = os.path.join(self.workdir, 'worker-stdout.log')
        self.func_log = os.path.join(self.workdir, 'logs', 'dataflux-func.log')
        self.home = os.path.join(self.workdir, 'home')

    # -- lifecycle --------------------------------------------------------------

    def start(self):
        for path in (self.python, os.path.join(self.func_src, 'worker', 'app.py')):
            if not os.path.exists(path):
                raise FuncTierError(f'missing {path} (run tests/functier/setup.sh)')
        try:
            self._start_redis()
            self._start_mariadb()
            self._load_schema()
            self._start_driver()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self):
        if self.driver is not None and self.driver.poll() is None:
            try:
                self._send({'cmd': 'quit'}, deadline=5)
            except Exception:       # noqa: BLE001  stopping anyway
                pass
        _stop(self.driver)
        _stop(self.mariadb, timeout=30)
        _stop(self.redis)
        self.driver = self.mariadb = self.redis = None
        if not os.environ.get('FUNCTIER_KEEP'):
            if self._own_workdir:
                shutil.rmtree(self.workdir, ignore_errors=True)
            else:        # keep the logs, not the database files
                shutil.rmtree(os.path.join(self.workdir, 'mariadb', 'data'), ignore_errors=True)

    def reset_home(self):
        """Empty the worker's home (its ~/.cache: our spool and dead letters),
        as on a fresh worker machine."""
        shutil.rmtree(self.home, ignore_errors=True)
        os.makedirs(self.home, exist_ok=True)

    def restart_worker(self):
        """A fresh worker process (same Redis and database): in-process caches
        (scripts for 30 s, env variables, module state) are gone."""
        if self.driver is not None and self.driver.poll() is None:
            try:
                self._send({'cmd': 'quit'}, deadline=5)
            except Exception:       # noqa: BLE001
                pass
        _stop(self.driver)
        self._start_driver()

    def _start_redis(self):
        exe = _which('redis-server', '/usr/sbin', '/usr/bin')
        if not exe:
            raise FuncTierError('redis-server not found (run tests/functier/setup.sh)')
        data = os.path.join(self.workdir, 'redis')
        os.makedirs(data, exist_ok=True)
        self.redis_port = free_port()
        log = os.path.join(data, 'redis.log')
        self.redis = subprocess.Popen(
            [exe, '--port', str(self.redis_port), '--bind', '127.0.0.1', '--dir', data,
             '--save', '', '--appendonly', 'no', '--daemonize', 'no', '--logfile', log,
             '--protected-mode', 'yes'],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_port(self.redis_port, self.redis, 'redis-server', log)

    def _start_mariadb(self):
        sbin = ('/usr/sbin', '/usr/bin', '/usr/local/sbin')
        server = _which('mariadbd', *sbin) or _which('mysqld', *sbin)
        install = _which('mariadb-install-db', *sbin) or _which('mysql_install_db', *sbin)
        if not server or not install:
            raise FuncTierError('mariadbd / mariadb-install-db not found (run tests/functier/setup.sh)')
        base = os.path.join(self.workdir, 'mariadb')
        data = os.path.join(base, 'data')
        os.makedirs(base, exist_ok=True)
        user = ['--user=root'] if os.geteuid() == 0 else []
        log = os.path.join(base, 'mariadb.log')
        with open(log, 'ab') as out:
            done = subprocess.run(
                [install, '--no-defaults', f'--datadir={data}', '--auth-root-authentication-method=normal',
                 '--skip-test-db', '--skip-name-resolve'] + user,
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, timeout=120)
        if done.returncode:
            raise FuncTierError(f'mariadb-install-db failed: {_tail(log)}')
        self.mysql_port = free_port()
        self.mysql_socket = os.path.join(base, 'mysqld.sock')
        self.mariadb = subprocess.Popen(
            [server, '--no-defaults', f'--datadir={data}', '--bind-address=127.0.0.1',
             f'--port={self.mysql_port}', f'--socket={self.mysql_socket}',
             f'--pid-file={os.path.join(base, "mysqld.pid")}', f'--log-error={log}',
             '--skip-log-bin', '--skip-name-resolve', '--innodb-buffer-pool-size=64M',
             '--innodb-log-file-size=16M',
             '--character-set-server=utf8mb4', '--collation-server=utf8mb4_unicode_ci'] + user,
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_port(self.mysql_port, self.mariadb, 'mariadbd', log)

    def _mysql(self, *args, stdin=None):
        client = _which('mariadb', '/usr/bin') or _which('mysql', '/usr/bin')
        if not client:
            raise FuncTierError('the mariadb client is not installed (run tests/functier/setup.sh)')
        done = subprocess.run([client, '--no-defaults', '-uroot', f'--socket={self.mysql_socket}',
                               '--protocol=socket'] + list(args),
                              stdin=stdin, capture_output=True, timeout=120)
        if done.returncode:
            raise FuncTierError(f'mariadb client {args}: {done.stderr.decode(errors="replace")}')
        return done.stdout.decode()

    def _load_schema(self):
        self._mysql('-e', 'CREATE DATABASE dataflux_func DEFAULT CHARACTER SET utf8mb4')
        with open(os.path.join(self.func_src, 'db', 'dataflux_func_latest.sql'), 'rb') as sql:
            self._mysql('dataflux_func', stdin=sql)

    def _driver_env(self):
        os.makedirs(self.home, exist_ok=True)
        env = {
            'PATH': os.environ.get('PATH', '/usr/bin:/bin'),
            'HOME': self.home,
            'LANG': 'C.UTF-8',
            'PYTHONUNBUFFERED': '1',
            'PYTHONPYCACHEPREFIX': os.path.join(self.workdir, 'pycache'),
            'FUNCTIER_FUNC_SRC': self.func_src,
            'FUNCTIER_WORKER_STDOUT': self.worker_stdout,
            # Func's configuration: defaults + these (the file does not exist).
            'DFF_CONFIG_FILE_PATH': os.path.join(self.workdir, 'user-config.yaml'),
            'DFF_MYSQL_HOST': '127.0.0.1',
            'DFF_MYSQL_PORT': str(self.mysql_port),
            'DFF_MYSQL_USER': 'root',
            'DFF_MYSQL_DATABASE': 'dataflux_func',
            'DFF_REDIS_HOST': '127.0.0.1',
            'DFF_REDIS_PORT': str(self.redis_port),
            'DFF_RESOURCE_ROOT_PATH': os.path.join(self.workdir, 'resources'),
            'DFF_LOG_FILE_PATH': self.func_log,
            # Nobody consumes the queues here: do not fill them at start.
            'DFF__DISABLE_STARTUP_TASKS': 'true',
            # No real AWS configuration can leak in.
            'AWS_SHARED_CREDENTIALS_FILE': os.devnull,
            'AWS_CONFIG_FILE': os.devnull,
            'AWS_EC2_METADATA_SERVICE_ENDPOINT': 'http://127.0.0.1:9',
            'AWS_METADATA_SERVICE_TIMEOUT': '1',
            'NO_PROXY': '127.0.0.1,localhost',
        }
        env.update({k: v for k, v in self.env.items() if v is not None})
        for key, value in self.env.items():
            if value is None:
                env.pop(key, None)
        return env

    def _start_driver(self):
        self.driver = subprocess.Popen(
            [self.python, '-u', DRIVER], cwd=self.func_src, env=self._driver_env(),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            text=True, encoding='utf-8', bufsize=1)
        self._replies = queue.Queue()
        threading.Thread(target=self._read_replies, args=(self.driver, self._replies),
                         name='functier-driver-reader', daemon=True).start()
        ready = self._receive(deadline=120)
        if not ready.get('ok'):
            raise FuncTierError(f'{ready.get("error")}\n{ready.get("traceback", "")}')
        self.driver_pid = ready['pid']

    @staticmethod
    def _read_replies(proc, replies):
        for line in proc.stdout:
            replies.put(line)
        replies.put(None)

    # -- protocol -----------------------------------------------------------------

    def _receive(self, deadline):
        try:
            line = self._replies.get(timeout=deadline)
        except queue.Empty:
            pid = self.driver.pid
            self.driver.send_signal(signal.SIGKILL)
            self.driver.wait(10)
            self.driver = None
            raise FuncTierError(f'the Func worker (pid {pid}) did not answer within {deadline} s and was '
                                f'killed; its stdout:\n{_tail(self.worker_stdout, 4000)}')
        if line is None:
            code = self.driver.wait(10)
            raise FuncTierError(f'the Func worker exited ({code}); its stdout:\n{_tail(self.worker_stdout, 4000)}')
        return json.loads(line)

    def _send(self, request, deadline=120):
        if self.driver is None or self.driver.poll() is not None:
            raise FuncTierError('the Func worker is not running')
        self.driver.stdin.write(json.dumps(request) + '\n')
        self.driver.stdin.flush()
        return self._receive(deadline)

    def call(self, cmd, deadline=120, **kwargs):
        reply = self._send(dict(kwargs, cmd=cmd), deadline=deadline)
        if not reply.pop('ok'):
            raise FuncTierError(f'{cmd}: {reply.get("error")}\n{reply.get("traceback", "")}')
        return reply

    # -- what a Func user does ----------------------------------------------------

    def publish(self, script_id, code, check=True, thread_grace=2.0):
        """Paste `code` as script `script_id` and publish it. Raises
        PublishFailed (check=True) when Func's pre-check fails."""
        reply = self.call('publish', deadline=120, script_id=script_id, code=code,
                          thread_grace=thread_grace)
        outcome = _task_result(reply)
        if check and outcome.status != 'success':
            raise PublishFailed(script_id, outcome)
        return outcome

    def publish_project_modules(self, check=True):
        """Every file of the README's paste table under its script id, in the
        table's order. Returns {script id: TaskResult}."""
        sys.path.insert(0, os.path.join(ROOT, 'tests'))
        from paste_table import paste_table
        outcomes = {}
        for filename, script_id in paste_table().items():
            with open(os.path.join(ROOT, filename), encoding='utf-8') as f:
                outcomes[script_id] = self.publish(script_id, f.read(), check=check)
        return outcomes

    def set_connector(self, connector_id, connector_type, config):
        self.call('connector', connector_id=connector_id, connector_type=connector_type, config=config)

    def set_datakit(self, url, connector_id='datakit', **extra):
        """A DataKit connector as Func's connector form saves it."""
        from urllib.parse import urlsplit
        parts = urlsplit(url)
        config = {'host': parts.hostname, 'port': parts.port or 9529, 'protocol': parts.scheme or 'http'}
        config.update(extra)
        self.set_connector(connector_id, 'df_datakit', config)

    def delete_connector(self, connector_id='datakit'):
        self.call('delete_connector', connector_id=connector_id)

    def set_env(self, name, value, auto_type_casting='string'):
        """A Func environment variable (DFF.ENV); value None removes it."""
        self.call('env', name=name, value=value, auto_type_casting=auto_type_casting)

    def set_process_env(self, **env):
        """The worker process's own environment (AWS_ENDPOINT_URL ...); None unsets."""
        self.call('process_env', env=env)

    def run(self, func_id, timeout=None, kwargs=None, thread_grace=2.0):
        """Run a published DFF.API function as a cron tick's task. `timeout`
        overrides the function's DFF.API(timeout=...)."""
        deadline = (timeout or 3600) + thread_grace + 60
        if timeout is None:
            deadline = 600
        return _task_result(self.call('run', deadline=deadline, func_id=func_id, kwargs=kwargs,
                                      timeout=timeout, thread_grace=thread_grace))

    def cache_entries(self, scope=None):
        """{scope: {key: {'type', 'value', 'ttl'}}} of DFF.CACHE."""
        return self.call('cache', scope=scope)

    def cache(self, scope=None):
        """DFF.CACHE values: {key: value} of `scope`, or {scope: {key: value}}."""
        entries = {s: {k: e['value'] for k, e in keys.items()}
                   for s, keys in self.cache_entries(scope).items() if s != 'ok'}
        if scope is not None:
            return entries.get(scope, {})
        return entries

    def clear_cache(self):
        return self.call('clear_cache')['deleted']

    def sql(self, statement, params=None):
        return self.call('sql', statement=statement, params=params)['rows']


def _task_result(reply):
    fields = {f.name for f in dataclasses.fields(TaskResult)}
    return TaskResult(**{k: v for k, v in reply.items() if k in fields})


if __name__ == '__main__':
    # A smoke run: python tests/functier/harness.py [FUNC_SRC]
    src = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, '..', 'shared', 'dataflux-func')
    t0 = time.monotonic()
    worker = FuncWorker(src).start()
    try:
        print(f'started in {time.monotonic() - t0:.1f} s')
        print(worker.publish('demo__hello', 'print("hello at publish")\n'
                             '@DFF.API("Hello", timeout=5)\n'
                             'def run():\n    print("hello", DFF.CACHE.get("n"))\n'
                             '    DFF.CACHE.set("n", 1, expire=60)\n    return 42\n'))
        print(worker.run('demo__hello.run'))
        print(worker.cache())
    finally:
        worker.stop()
