"""A stand-in for DataFlux Func's DFF, for startup scripts run outside Func.

It behaves as Func's does where our modules depend on it:
    DFF.API(title, timeout=1..3600, fixed_crontab='5 fields', ...)
        records the function; bad options are a ConfigError (Func fails the
        publish).
    DFF.SRC(id) / DFF.CONN(id)
        a DataKit connector: write_by_category_many(category, points) sends 100
        points a request, raises on HTTP >= 400 and returns (status, body) of
        the last request.
    DFF.CACHE
        get/set/delete/expire; values are str, int or float (anything else
        raises, as Func's Redis does) and come back as str; `expires=` or
        `expire=` in seconds; files of mode 0600 named by a hash of the key.
    DFF.ENV(name)
        the process environment (JSON values are decoded).

Environment
    DATAKIT_URL             DataKit to write to (http://127.0.0.1:9529).
    INTEGRATION_STATE_DIR   where the cache lives (~/.cache/dataflux-integration).
"""
import contextlib
import gzip
import hashlib
import json
import logging
import os
import random
import socket
import time
import urllib.error
import urllib.parse
import urllib.request

import integration_core__runner as core
from integration_core__runner import ConfigError, DataKitError, encode_points

LOG = logging.getLogger('integration.local')

DEFAULT_DATAKIT_URL = 'http://127.0.0.1:9529'
GZIP_THRESHOLD = 16 * 1024       # bytes of line protocol above which we gzip
WRITE_ATTEMPTS = 4
WRITE_TIMEOUT = 30.0
SOURCE = 'dataflux-func-integration'
CACHE_VALUE_TYPES = (str, int, float)


class _RefuseRedirects(urllib.request.HTTPRedirectHandler):
    """urllib follows a 301/302/303 of a POST as a GET without the body: the
    points would be lost while the run said "written". A redirect is an answer
    like any other 3xx: the URL is not DataKit's (a configuration error)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


_NO_REDIRECTS = urllib.request.build_opener(_RefuseRedirects)


def install(dff):
    """Make `dff` the DFF that Runner.run() uses outside Func."""
    core._RUNTIME['dff'] = dff
    return dff


class LocalDFF:
    """What a startup script needs of DFF, outside Func."""

    def __init__(self, datakit_url=None, output=None, cache=None, sleep=time.sleep):
        self.datakit_url = datakit_url or os.environ.get('DATAKIT_URL') or DEFAULT_DATAKIT_URL
        self.output = output
        self.sleep = sleep
        self.CACHE = cache or FileCache()
        self.apis = []

    def API(self, title, category='general', tags=None, timeout=None, cache_result=None,
            fixed_crontab=None, expires=None, **options):
        api = _check_api(title, timeout, fixed_crontab)

        def register(func):
            api['func'] = func
            api['name'] = func.__name__
            self.apis.append(api)
            return func
        return register

    def SRC(self, connector_id='datakit', **_):
        if self.output is not None:
            return self.output
        return DataKitClient(self.datakit_url, sleep=self.sleep)

    CONN = SRC

    @staticmethod
    def ENV(name):
        value = os.environ.get(name)
        if value is None:
            return None
        try:
            return json.loads(value)
        except ValueError:
            return value


def _check_api(title, timeout, fixed_crontab):
    if not isinstance(title, str) or not title.strip():
        raise ConfigError('@DFF.API(title, ...): the title must be a non-empty string')
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, int)
                                or not 1 <= timeout <= 3600):
        raise ConfigError(f'@DFF.API({title!r}, timeout={timeout!r}): timeout must be a whole '
                          'number of seconds from 1 to 3600')
    if fixed_crontab is not None:
        _check_crontab(fixed_crontab, f'@DFF.API({title!r}, fixed_crontab={fixed_crontab!r})')
    return {'title': title, 'timeout': timeout or 30, 'fixed_crontab': fixed_crontab}


def _check_crontab(expression, where):
    import croniter
    if not isinstance(expression, str) or len(expression.split()) != 5:
        raise ConfigError(f'{where}: a crontab must have 5 fields (minute hour day month '
                          "weekday), e.g. '*/15 * * * *'; Func has no seconds field")
    if not croniter.croniter.is_valid(expression):
        raise ConfigError(f'{where}: not a valid crontab expression; e.g. \'*/15 * * * *\'')


class FileCache:
    """DFF.CACHE on disk, with the semantics of Func's (Redis): values are str,
    int or float and come back as str; `expires` (or `expire`) in seconds;
    `scope` defaults to the script's. Files of mode 0600 named by a hash of
    scope and key, so no key text ends up in a file name."""

    def __init__(self, root=None, clock=time.time, default_scope=None):
        self.dir = os.path.join(root or core.state_dir(), 'cache')
        self.clock = clock
        self.default_scope = default_scope

    def _path(self, key, scope=None):
        scope = self.default_scope if scope is None else scope
        digest = hashlib.sha256(f'{scope or ""}\0{key}'.encode()).hexdigest()
        return os.path.join(self.dir, digest + '.json')

    def get(self, key, scope=None):
        try:
            with open(self._path(key, scope), encoding='utf-8') as f:
                entry = json.load(f)
            value, expires = entry['value'], entry.get('expires')
            if not isinstance(value, str) or not (expires is None or isinstance(expires, (int, float))):
                raise ValueError('unexpected shape')
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as e:
            # A foreign or damaged file counts as absent, as a Redis key would.
            LOG.warning('[cache] ignoring an unreadable cache file %s: %s',
                        os.path.basename(self._path(key, scope)), type(e).__name__)
            return None
        if expires is not None and expires <= self.clock():
            self.delete(key, scope)
            return None
        return value

    def set(self, key, value, scope=None, expires=None, expire=None, not_exists=False):
        if isinstance(value, bool) or not isinstance(value, CACHE_VALUE_TYPES):
            raise TypeError(f'DFF.CACHE.set({key!r}, ...): the value must be a str, int or float '
                            f'(store JSON text), not {type(value).__name__}')
        if not_exists and self.get(key, scope) is not None:
            return False
        seconds = expires or expire
        # Not synced to the disk, as Redis does not sync each write: a value
        # lost to a power failure is a cache miss (an STS call, a collection
        # not skipped), and a sync costs 1-4 ms a write (an Organization's
        # run writes one skip record per account).
        core.atomic_write(self._path(key, scope), json.dumps(
            {'value': str(value), 'expires': self.clock() + seconds if seconds else None}),
            durable=False)
        return True

    def delete(self, key, scope=None):
        with contextlib.suppress(FileNotFoundError):
            os.remove(self._path(key, scope))

    def expire(self, key, expires=None, scope=None, expire=None):
        value = self.get(key, scope)
        if value is not None:
            self.set(key, value, scope, expires=expires or expire)


class DataKitClient:
    """POST /v1/write/<category>?input=...&precision=ns with the write methods of
    Func's DataKit connector; each returns (status, body) and raises
    DataKitError on >= 400. write_line_protocol sends lines as they are (what
    Delivery sends, spools and sends again). Retries, with backoff, only what
    may pass later (DataKitError.kind 'transient': unreachable, 408, 429, 5xx);
    any other answer is raised at once."""

    def __init__(self, url=DEFAULT_DATAKIT_URL, source=SOURCE, timeout=WRITE_TIMEOUT,
                 attempts=WRITE_ATTEMPTS, sleep=time.sleep):
        self.url = url.rstrip('/')
        self.target = self.url
        self.source = source
        self.timeout = timeout
        self.attempts = attempts
        self.sleep = sleep

    def __repr__(self):
        return f'<DataKitClient {self.url}>'

    def write_by_category(self, category, measurement, tags=None, fields=None, timestamp=None):
        return self.write_by_category_many(category, [
            {'measurement': measurement, 'tags': tags, 'fields': fields, 'timestamp': timestamp}])

    def write_by_category_many(self, category, data):
        """As Func's connector: 100 points a request, raise on HTTP >= 400, and
        return (status, body) of the last request; nothing is sent for []."""
        result = None
        for start in range(0, len(data), core.BATCH_SIZE):
            lines = encode_points(data[start:start + core.BATCH_SIZE])
            result = self._post(category, '\n'.join(lines).encode('utf-8'))
        return result

    def write_line_protocol(self, category, lines):
        """One request with `lines` (line protocol, one point each) as they are."""
        return self._post(category, '\n'.join(lines).encode('utf-8'))

    def write_metric(self, measurement, tags=None, fields=None, timestamp=None):
        return self.write_by_category('metric', measurement, tags, fields, timestamp)

    def write_metric_many(self, data):
        return self.write_by_category_many('metric', data)

    def write_logging(self, source, message=None, tags=None, fields=None, timestamp=None):
        fields = dict(fields or {})
        if message is not None:
            fields['message'] = message
        return self.write_by_category('logging', source, tags, fields, timestamp)

    def write_logging_many(self, data):
        return self.write_by_category_many('logging', data)

    def _post(self, category, body):
        query = urllib.parse.urlencode({'input': self.source, 'precision': 'ns'})
        headers = {'Content-Type': 'text/plain; charset=utf-8'}
        if len(body) > GZIP_THRESHOLD:
            body = gzip.compress(body, compresslevel=5)
            headers['Content-Encoding'] = 'gzip'
        url = f'{self.url}/v1/write/{urllib.parse.quote(category)}?{query}'
        error = None
        for attempt in range(1, self.attempts + 1):
            request = urllib.request.Request(url, data=body, headers=headers, method='POST')
            retry_after = None
            try:
                with _NO_REDIRECTS.open(request, timeout=self.timeout) as resp:
                    return resp.status, resp.read().decode('utf-8', 'replace')
            except urllib.error.HTTPError as e:
                text = e.read().decode('utf-8', 'replace')[:2000]
                error = DataKitError(e.code, _datakit_message(text) or e.reason)
                if error.kind != 'transient':
                    raise error from None
                retry_after = e.headers.get('Retry-After')
            except (urllib.error.URLError, OSError) as e:
                reason = getattr(e, 'reason', e)
                # Reached, and no answer in time (urllib wraps a timeout before
                # the request was sent, the connect's, in URLError: unreachable).
                timed_out = (not isinstance(e, urllib.error.URLError)
                             and isinstance(e, (socket.timeout, TimeoutError)))
                error = DataKitError(None, f'{self.url}: ' + (
                    f'no answer within {self.timeout:g} s' if timed_out else str(reason)), timed_out)
            if attempt < self.attempts:
                delay = _backoff(attempt, retry_after)
                LOG.warning('[DataKit] %s; retry %d/%d in %.1f s', error, attempt,
                            self.attempts - 1, delay)
                self.sleep(delay)
        raise error


def _datakit_message(text):
    try:
        data = json.loads(text)
        return f"{data.get('error_code', '')}: {data.get('message', '')}".strip(': ')
    except (ValueError, AttributeError):
        return text.strip()


def _backoff(attempt, retry_after=None):
    if retry_after and str(retry_after).isdigit():
        return min(float(retry_after), 30.0)
    return min(8.0, 0.5 * 2 ** (attempt - 1)) * (0.5 + random.random() / 2)


class LineProtocolWriter:
    """The local DFF.SRC for `--output -|FILE`: prints line protocol instead."""

    def __init__(self, stream, name):
        self.stream = stream
        self.target = name

    def write_by_category_many(self, category, data):
        return self.write_line_protocol(category, encode_points(data))

    def write_line_protocol(self, category, lines):
        """The lines Delivery encoded already (core._raw_writer), as they are."""
        for line in lines:
            self.stream.write(line + '\n')
        self.stream.flush()
        return 200, ''

    def write_by_category(self, category, measurement, tags=None, fields=None, timestamp=None):
        return self.write_by_category_many(category, [
            {'measurement': measurement, 'tags': tags, 'fields': fields, 'timestamp': timestamp}])
