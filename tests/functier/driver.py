"""One long-lived DataFlux Func worker process, driven over JSON lines.

Runs under Func's own Python (3.8, the venv that setup.sh builds), imports the
worker from Func's source tree (FUNCTIER_FUNC_SRC) and does what Func does,
with Func's own code wherever Func has code for it:

- publish: what Func's server does when a user presses "Publish": store the
  draft, run the `Func.Debugger` pre-check task (the module body runs here),
  and only when it succeeds copy the draft to the published code, replace the
  script's `biz_main_func` rows with the `DFF.API` functions it found, and run
  `Internal.ReloadDataMD5Cache` so that workers drop their cached copy;
- connector / env: rows in `biz_main_connector` / `biz_main_env_variable`
  (secret fields ciphered as the server does), then the same MD5 reload;
- run: the task request a cron tick makes (`CronJob.Starter.put_tasks`) run
  exactly as `worker/app.py:consume` runs it: `FuncRunner.from_task_request`
  and `task.start()` under `timeout_decorator.timeout(task.timeout,
  timeout_exception=TaskTimeout)`, in this process's main thread, so several
  tasks share one worker process as in production;
- cache: what DFF.CACHE holds in Redis, per scope.

Protocol: one JSON object a line on stdin ({"cmd": ..., ...}); one JSON object
a line back on the ORIGINAL stdout ({"ok": true, ...} or {"ok": false,
"error": ...}). File descriptors 1 and 2 are then pointed at
FUNCTIER_WORKER_STDOUT: the worker's own console log, `logging` and anything
a script writes to sys.stdout go there, as in a real worker's container log.

Python 3.8 syntax only: this file runs under Func's interpreter.
"""
import ipaddress
import json
import os
import socket
import sys
import threading
import time
import traceback

# -- network guard: this process may talk to loopback only --------------------

_LOOPBACK_NAMES = {'localhost', 'localhost.localdomain', 'ip6-localhost'}
_BLOCKED = []


def _is_loopback(host):
    if host is None:
        return True
    host = host.decode() if isinstance(host, bytes) else str(host)
    if host in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip('[]').split('%')[0]).is_loopback
    except ValueError:
        return False


def _install_network_guard():
    real_getaddrinfo = socket.getaddrinfo
    real_connect = socket.socket.connect
    real_connect_ex = socket.socket.connect_ex

    def getaddrinfo(host, *args, **kwargs):
        if not _is_loopback(host):
            _BLOCKED.append(str(host))
            raise OSError('functier network guard: {} is not loopback'.format(host))
        return real_getaddrinfo(host, *args, **kwargs)

    def check(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6) and not _is_loopback(address[0]):
            _BLOCKED.append(str(address[0]))
            raise OSError('functier network guard: {} is not loopback'.format(address[0]))

    def connect(self, address):
        check(self, address)
        return real_connect(self, address)

    def connect_ex(self, address):
        check(self, address)
        return real_connect_ex(self, address)

    socket.getaddrinfo = getaddrinfo
    socket.socket.connect = connect
    socket.socket.connect_ex = connect_ex


# -- the worker ------------------------------------------------------------------

class Driver:
    def __init__(self):
        # Imported here: Func's modules read their configuration (DFF_* env)
        # at import time.
        import timeout_decorator
        import pymysql
        from worker import app          # what `python worker/app.py` loads
        from worker import app_init
        from worker.utils import toolkit, yaml_resources
        from worker.tasks import TaskTimeout
        from worker.tasks.func import CONNECTOR_CIPHER_FIELDS

        self.timeout_decorator = timeout_decorator
        self.app = app
        self.toolkit = toolkit
        self.TaskTimeout = TaskTimeout
        self.cipher_fields = CONNECTOR_CIPHER_FIELDS
        self.CONFIG = yaml_resources.get('CONFIG')

        # What worker/app.py:main does once before consuming tasks.
        app_init.prepare()

        self.REDIS = app.REDIS
        self.db = pymysql.connect(
            host=self.CONFIG['MYSQL_HOST'], port=int(self.CONFIG['MYSQL_PORT']),
            user=self.CONFIG['MYSQL_USER'], password=self.CONFIG['MYSQL_PASSWORD'] or '',
            database=self.CONFIG['MYSQL_DATABASE'], charset='utf8mb4', autocommit=True,
            cursorclass=pymysql.cursors.DictCursor)
        self.stdout_path = os.environ['FUNCTIER_WORKER_STDOUT']

    # -- helpers ---------------------------------------------------------------

    def sql(self, statement, params=None):
        self.db.ping(reconnect=True)
        with self.db.cursor() as cur:
            cur.execute(statement, params)
            return cur.fetchall()

    def run_task(self, task_req):
        """worker/app.py:consume, from the point where the request is popped."""
        task_cls = self.app.TASK_CLS_MAP[task_req['name']]
        task_inst = task_cls.from_task_request(task_req)

        @self.timeout_decorator.timeout(task_inst.timeout, timeout_exception=self.TaskTimeout)
        def start_task():
            task_inst.start()

        start_task()
        return task_inst

    def reload_md5(self, data_type, data_id):
        """What the server queues after changing a script, connector or env variable."""
        task = self.run_task({'name': 'Internal.ReloadDataMD5Cache',
                              'kwargs': {'type': data_type, 'id': data_id}})
        if task.status != 'success':
            raise RuntimeError('ReloadDataMD5Cache {} {}: {} {}'.format(
                data_type, data_id, task.status, task.exception_text))

    def _stdout_offset(self):
        try:
            return os.path.getsize(self.stdout_path)
        except OSError:
            return 0

    def _stdout_since(self, offset):
        sys.stdout.flush()
        sys.stderr.flush()
        with open(self.stdout_path, 'rb') as f:
            f.seek(offset)
            return f.read().decode('utf-8', 'replace')

    @staticmethod
    def _thread_report(before, grace):
        """Threads started since `before` that are still alive `grace` seconds
        after the task (polled: returns as soon as none is left)."""
        def new_alive():
            return [t for t in threading.enumerate() if t not in before and t.is_alive()]

        at_end = new_alive()
        deadline = time.monotonic() + grace
        alive = at_end
        while alive and time.monotonic() < deadline:
            time.sleep(0.05)
            alive = new_alive()
        describe = lambda ts: [{'name': t.name, 'daemon': t.daemon} for t in ts]  # noqa: E731
        return describe(at_end), describe(alive)

    def _measured(self, task_req, grace):
        before_threads = set(threading.enumerate())
        blocked_before = len(_BLOCKED)
        offset = self._stdout_offset()
        cpu0, wall0 = time.process_time(), time.monotonic()
        driver_error = None
        task = None
        try:
            task = self.run_task(task_req)
        except BaseException as e:      # noqa: B902  a TaskTimeout outside start()'s own handler
            driver_error = '{}: {}'.format(type(e).__name__, e)
        wall, cpu = time.monotonic() - wall0, time.process_time() - cpu0
        at_end, alive = self._thread_report(before_threads, grace)
        return task, {
            'wall': round(wall, 3),
            'cpu': round(cpu, 3),
            'threads_at_end': at_end,
            'threads_alive': alive,
            'thread_grace': grace,
            'blocked_hosts': _BLOCKED[blocked_before:],
            'worker_stdout': self._stdout_since(offset),
            'driver_error': driver_error,
        }

    @staticmethod
    def _messages(task):
        scope = getattr(task, 'script_scope', None)
        if not scope:
            return []
        return [line['message'] for line in (scope['DFF'].print_log_lines or [])]

    # -- commands --------------------------------------------------------------

    def cmd_ping(self):
        return {'pid': os.getpid(), 'python': sys.version.split()[0]}

    def cmd_publish(self, script_id, code, title=None, thread_grace=2.0):
        if '__' not in script_id:
            raise ValueError('a script id is <script set>__<script>: {!r}'.format(script_id))
        set_id = script_id.split('__', 1)[0]
        md5 = self.toolkit.get_md5(code)
        self.sql('INSERT IGNORE INTO biz_main_script_set (id, title) VALUES (%s, %s)', [set_id, set_id])
        self.sql('INSERT INTO biz_main_script (id, scriptSetId, title, codeDraft, codeDraftMD5) '
                 'VALUES (%s, %s, %s, %s, %s) ON DUPLICATE KEY UPDATE '
                 'codeDraft = VALUES(codeDraft), codeDraftMD5 = VALUES(codeDraftMD5)',
                 [script_id, set_id, title or script_id, code, md5])

        # The pre-check task the server sends (scriptAPICtrl.publish): the
        # debugger runs the DRAFT; imported scripts are their published code.
        task_req = {
            'name': 'Func.Debugger',
            'id': self.toolkit.gen_task_id(),
            'kwargs': {'funcId': script_id},
            'triggerTime': self.toolkit.get_timestamp(3),
            'queue': self.CONFIG['_FUNC_TASK_QUEUE_DEBUGGER'],
            'timeout': self.CONFIG['_FUNC_TASK_TIMEOUT_DEBUGGER'],
            'ignoreResult': False,
        }
        task, measured = self._measured(task_req, thread_grace)
        result = (task.result if task else None) or {}
        status = result.get('status') or (task.status if task else 'driver-error')
        if task and task.status != 'success':
            status = task.status       # the debugger task itself timed out
        out = {
            'status': status,
            'exception': result.get('exception') or (task.exception_text if task else None),
            'traceback': result.get('traceback') or (task.traceback if task else None),
            'print_log': list(result.get('printLogs') or []),
            'messages': self._messages(task) if task else [],
            'api_funcs': result.get('apiFuncs') or [],
        }
        out.update(measured)
        if status != 'success':
            return out

        # Publish: the draft becomes the code; the functions are replaced.
        self.sql('UPDATE biz_main_script SET code = codeDraft, codeMD5 = codeDraftMD5, '
                 'publishVersion = publishVersion + 1 WHERE id = %s', [script_id])
        self.sql('DELETE FROM biz_main_func WHERE scriptId = %s', [script_id])
        for f in out['api_funcs']:
            self.sql('INSERT INTO biz_main_func (id, scriptSetId, scriptId, name, title, description, '
                     'definition, argsJSON, kwargsJSON, extraConfigJSON, category, integration, '
                     'tagsJSON, defOrder) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)',
                     ['{}.{}'.format(script_id, f['name']), set_id, script_id, f['name'], f.get('title'),
                      f.get('description'), f.get('definition') or f['name'],
                      json.dumps(f.get('args')), json.dumps(f.get('kwargs')),
                      json.dumps(f.get('extraConfig') or {}), f.get('category') or 'general',
                      f.get('integration'), json.dumps(f.get('tags')) if f.get('tags') else None,
                      f.get('defOrder') or 0])
        version = self.sql('SELECT publishVersion FROM biz_main_script WHERE id = %s', [script_id])[0]
        self.sql('INSERT INTO biz_main_script_publish_history (id, scriptId, scriptPublishVersion, '
                 'scriptCode_cache) VALUES (%s, %s, %s, %s)',
                 [self.toolkit.gen_data_id('sph'), script_id, version['publishVersion'], code])
        self.reload_md5('script', script_id)
        out['publish_version'] = version['publishVersion']
        return out

    def cmd_connector(self, connector_id, connector_type, config, title=None):
        config = dict(config)
        # As the server stores them: these fields ciphered with SECRET, salted
        # with the connector id (a DataKit connector has none of them).
        for field in self.cipher_fields:
            if config.get(field) is not None:
                config[field + 'Cipher'] = self.toolkit.cipher_by_aes(
                    config.pop(field), self.CONFIG['SECRET'], connector_id)
        self.sql('INSERT INTO biz_main_connector (id, title, type, configJSON) VALUES (%s, %s, %s, %s) '
                 'ON DUPLICATE KEY UPDATE type = VALUES(type), configJSON = VALUES(configJSON)',
                 [connector_id, title or connector_id, connector_type, json.dumps(config)])
        self.reload_md5('connector', connector_id)
        return {}

    def cmd_delete_connector(self, connector_id):
        self.sql('DELETE FROM biz_main_connector WHERE id = %s', [connector_id])
        self.reload_md5('connector', connector_id)
        return {}

    def cmd_env(self, name, value, auto_type_casting='string'):
        if value is None:
            self.sql('DELETE FROM biz_main_env_variable WHERE id = %s', [name])
        else:
            text = value if isinstance(value, str) else json.dumps(value)
            if auto_type_casting == 'password':
                text = self.toolkit.cipher_by_aes(text, self.CONFIG['SECRET'], name)
            self.sql('INSERT INTO biz_main_env_variable (id, title, autoTypeCasting, valueTEXT) '
                     'VALUES (%s, %s, %s, %s) ON DUPLICATE KEY UPDATE '
                     'autoTypeCasting = VALUES(autoTypeCasting), valueTEXT = VALUES(valueTEXT)',
                     [name, name, auto_type_casting, text])
        self.reload_md5('envVariable', name)
        return {}

    def cmd_process_env(self, env):
        """The worker process's own environment (what os.environ / botocore see)."""
        for key, value in env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = str(value)
        return {}

    def cmd_run(self, func_id, kwargs=None, timeout=None, thread_grace=2.0, origin='cronJob'):
        if '.' not in func_id:
            raise ValueError('a function id is <script id>.<function name>: {!r}'.format(func_id))
        rows = self.sql('SELECT f.extraConfigJSON, f.title AS funcTitle, s.title AS scriptTitle, '
                        'ss.title AS scriptSetTitle FROM biz_main_func f '
                        'JOIN biz_main_script s ON s.id = f.scriptId '
                        'JOIN biz_main_script_set ss ON ss.id = f.scriptSetId WHERE f.id = %s', [func_id])
        if not rows:
            raise LookupError('no published DFF.API function {!r}'.format(func_id))
        extra = rows[0]['extraConfigJSON'] or {}
        if isinstance(extra, str):
            extra = json.loads(extra) or {}

        # The request CronJob.Starter.put_tasks builds for one cron tick.
        cron_job_id = 'cron-functier-' + func_id.replace('.', '-')
        exec_mode = 'cronJob'
        task_kwargs = {
            'funcId': func_id,
            'funcCallKwargs': kwargs or {},
            'origin': origin,
            'originId': cron_job_id,
            'cronExpr': extra.get('fixedCronExpr'),
            'cronJobDelay': 0,
            'cronJobLockKey': self.toolkit.get_cache_key('lock', 'CronJob', tags=[
                'cronJobId', cron_job_id, 'funcId', func_id, 'execMode', exec_mode]),
            'cronJobLockValue': '{}-{}'.format(int(time.time()), self.toolkit.gen_uuid()),
            'cronJobExecMode': exec_mode,
            'scriptSetTitle': rows[0]['scriptSetTitle'],
            'scriptTitle': rows[0]['scriptTitle'],
            'funcTitle': rows[0]['funcTitle'],
        }
        task_req = {
            'name': 'Func.Runner',
            'id': self.toolkit.gen_task_id(),
            'kwargs': task_kwargs,
            'triggerTime': self.toolkit.get_timestamp(3),
            'queue': extra.get('queue') or self.CONFIG['_FUNC_TASK_QUEUE_CRON_JOB'],
            'delay': 0,
            'timeout': int(timeout) if timeout else (extra.get('timeout') or self.CONFIG['_FUNC_TASK_TIMEOUT_DEFAULT']),
            'expires': extra.get('expires') or self.CONFIG['_FUNC_TASK_EXPIRES_DEFAULT'],
            'taskRecordLimit': None,
        }
        task, measured = self._measured(task_req, thread_grace)
        out = {
            'task_id': task_req['id'],
            'timeout': task_req['timeout'],
            'status': task.status if task else 'driver-error',
            'result': (task.return_value if task else None),
            'exception': task.exception_text if task else None,
            'exception_type': task.exception_type if task else None,
            'traceback': task.traceback if task else None,
            'print_log': list(task.print_log_lines) if task else [],
            'messages': self._messages(task) if task else [],
        }
        out.update(measured)
        return out

    def _cache_prefix_suffix(self):
        template = self.toolkit.get_cache_key('funcCache', '\n', tags=['key', '\n'])
        prefix, middle, suffix = template.split('\n')
        return prefix, middle, suffix

    def cmd_cache(self, scope=None):
        """{scope: {key: {'type', 'value', 'ttl'}}} of every DFF.CACHE entry
        (of `scope` only when given)."""
        prefix, middle, suffix = self._cache_prefix_suffix()
        pattern = prefix + (scope if scope else '*') + middle + '*' + suffix
        out = {}
        for raw_key in self.REDIS.keys(pattern):
            key = raw_key.decode() if isinstance(raw_key, bytes) else raw_key
            body = key[len(prefix):len(key) - len(suffix)]
            key_scope, _, name = body.partition(middle)
            client = self.REDIS.client
            kind = client.type(key).decode()
            if kind == 'string':
                value = client.get(key)
            elif kind == 'hash':
                value = client.hgetall(key)
            elif kind == 'list':
                value = client.lrange(key, 0, -1)
            elif kind == 'set':
                value = sorted(client.smembers(key))
            elif kind == 'zset':
                value = client.zrange(key, 0, -1, withscores=True)
            else:
                value = None
            out.setdefault(key_scope, {})[name] = {
                'type': kind, 'value': _decode(value), 'ttl': client.ttl(key)}
        return out

    def cmd_clear_cache(self):
        """Forget every DFF.CACHE entry (not Func's own keys)."""
        prefix, middle, suffix = self._cache_prefix_suffix()
        keys = self.REDIS.keys(prefix + '*' + middle + '*' + suffix)
        if keys:
            self.REDIS.client.delete(*keys)
        return {'deleted': len(keys)}

    def cmd_sql(self, statement, params=None):
        """For tests that assert what Func stored."""
        return {'rows': _decode(list(self.sql(statement, params)))}


def _decode(value):
    if isinstance(value, bytes):
        return value.decode('utf-8', 'replace')
    if isinstance(value, dict):
        return {_decode(k): _decode(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_decode(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def main():
    proto = os.fdopen(os.dup(1), 'w', buffering=1, encoding='utf-8')
    log_fd = os.open(os.environ['FUNCTIER_WORKER_STDOUT'], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.close(log_fd)

    func_src = os.environ['FUNCTIER_FUNC_SRC']
    sys.path.insert(0, func_src)
    os.chdir(func_src)           # a worker runs from Func's root (tracebacks use it)
    _install_network_guard()

    def reply(obj):
        proto.write(json.dumps(obj, default=repr) + '\n')
        proto.flush()

    try:
        driver = Driver()
    except BaseException as e:  # noqa: B902
        reply({'ok': False, 'error': 'worker start failed: {}: {}'.format(type(e).__name__, e),
               'traceback': traceback.format_exc()})
        return 1
    reply({'ok': True, 'ready': True, 'pid': os.getpid()})

    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            request = json.loads(line)
            cmd = request.pop('cmd')
            if cmd == 'quit':
                reply({'ok': True})
                break
            handler = getattr(driver, 'cmd_' + cmd)
            out = handler(**request)
            out['ok'] = True
            reply(out)
        except BaseException as e:  # noqa: B902
            reply({'ok': False, 'error': '{}: {}'.format(type(e).__name__, e),
                   'traceback': traceback.format_exc()})
    return 0


if __name__ == '__main__':
    sys.exit(main())
