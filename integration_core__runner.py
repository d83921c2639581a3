"""The core Runner of the integration set, and the local runtime for DataFlux Func
startup scripts.

Public entry points
    Runner(collector_or_list, debug=False, datakit_id='datakit', force=None).run()
        Runs collectors in list order and writes their points to DataKit through
        DFF.SRC(datakit_id).write_by_category_many(category, batch), 100 points a
        call. Returns a summary; raises RunFailed after everything was delivered
        when anything failed, so Func marks the task failed.
    python -m integration_core__runner run|serve|check|demo ...
        (console script `integration-runner`): the same startup scripts on any
        machine. See `--help` and the README.

What a collector gives the Runner (integration_aws_ec2__main.DataCollector does)
    title, category ('custom_object' or 'metric'), min_interval (seconds),
    state_key (str), optional start() and cancel() (begin collecting before the
    identity call; stop when the account fails),
    identity() -> {'method', 'account_id', 'arn', 'partition'},
    collect() -> iterator of {'measurement', 'tags', 'fields', 'timestamp'},
    results (after collect: one dict per region with 'region', 'instances',
    'pages', 'api_calls', 'seconds', 'error'), check() -> [{'region', 'ok', 'reason'}].

Inside Func the real DFF is used. Outside Func (`run`, `serve`, `check`) a local
stand-in provides DFF.API, DFF.SRC/CONN (a DataKit HTTP client), DFF.CACHE (files
of mode 0600) and DFF.ENV (environment variables).

Environment
    DATAKIT_URL             DataKit for the local runtime (http://127.0.0.1:9529).
    INTEGRATION_STATE_DIR   spool, dead letters, cache (~/.cache/dataflux-integration).
    INTEGRATION_FORCE=1     collect even when the last collection is fresh.
"""
import argparse
import builtins
import contextlib
import datetime
import fcntl
import gzip
import hashlib
import json
import logging
import math
import os
import random
import re
import signal
import sys
import tempfile
import threading
import time
import traceback
import urllib.error
import urllib.parse
import urllib.request
import uuid

LOG = logging.getLogger('integration.core')

DEFAULT_DATAKIT_URL = 'http://127.0.0.1:9529'
BATCH_SIZE = 100                 # what Func's own DataKit helper sends per request
MIN_INTERVAL = {'custom_object': 900, 'object': 900, 'metric': 60}
GZIP_THRESHOLD = 16 * 1024       # bytes of line protocol above which we gzip
WRITE_ATTEMPTS = 4
WRITE_TIMEOUT = 30.0
SOURCE = 'dataflux-func-integration'
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class ConfigError(ValueError):
    """A user mistake in a startup script or its dicts: one line, exit 2."""


class RunFailed(Exception):
    """Raised by Runner.run() after delivery when something failed; `.summary`."""

    def __init__(self, message, summary):
        super().__init__(message)
        self.summary = summary


class DataKitError(Exception):
    """DataKit answered an error, or could not be reached (status None)."""

    def __init__(self, status, message):
        super().__init__(f'DataKit {"HTTP " + str(status) if status else "unreachable"}: {message}')
        self.status = status
        self.body = message

    @property
    def rejected(self):
        """A 4xx other than 429: the points themselves are wrong; retrying won't help."""
        return self.status is not None and 400 <= self.status < 500 and self.status != 429


class InvalidPoint(DataKitError):
    """A point that cannot be line protocol (no fields, NaN, no measurement):
    never sent, and, like a point DataKit rejects, kept as a dead letter."""
    rejected = True

    def __init__(self, message):
        Exception.__init__(self, f'invalid point: {message}')
        self.status = None
        self.body = message


class JobTimeout(BaseException):
    """A run past its @DFF.API timeout; like Func's, `except Exception` can't catch it."""


# --------------------------------------------------------------------------
# The Runner
# --------------------------------------------------------------------------

class Runner:
    """Run collectors in order; write, report and fail loudly, never partially."""

    def __init__(self, collector_or_list, debug=False, datakit_id='datakit', force=None):
        self.collectors = (list(collector_or_list)
                           if isinstance(collector_or_list, (list, tuple)) else [collector_or_list])
        if not self.collectors:
            raise ConfigError('Runner(...) needs at least one collector')
        for number, collector in enumerate(self.collectors, 1):
            if not (callable(getattr(collector, 'collect', None))
                    and callable(getattr(collector, 'identity', None))):
                raise ConfigError(
                    f'Runner(...): collector #{number} is a {type(collector).__name__}, not a '
                    'collector: pass main.DataCollector(account, collector_configs)')
        if not isinstance(datakit_id, str) or not datakit_id:
            raise ConfigError(f"Runner(datakit_id={datakit_id!r}): the DataKit connector's id "
                              "must be a non-empty string, e.g. 'datakit'")
        self.debug = bool(debug)
        self.datakit_id = datakit_id
        if force is None:
            force = _RUNTIME.get('force') or _env_flag('INTEGRATION_FORCE')
        self.force = bool(force)

    def run(self):
        dff = current_dff()
        quiet_sdk_loggers()
        with log_to_stdout():
            if _RUNTIME.get('mode') == 'check':
                return self._check()
            return self._run(dff)

    def _run(self, dff):
        started = time.monotonic()
        connector = dff.SRC(self.datakit_id)
        delivery = None if self.debug else Delivery(connector, self.datakit_id)
        LOG.info('[Runner] DataKit connector: %s (%s)%s', self.datakit_id,
                 getattr(connector, 'target', 'Func connector'),
                 ' - debug: collecting only, nothing is written' if self.debug else '')
        if delivery:
            delivery.resend_spool()
        summary = {'points_written': 0, 'points_collected': 0, 'collectors': []}
        for number, collector in enumerate(self.collectors, 1):
            summary['collectors'].append(self._run_collector(number, collector, dff, delivery))
        if delivery:
            summary['points_written'] = delivery.written
            summary['points_spooled'] = delivery.spooled
            summary['points_dead_lettered'] = delivery.dead_lettered
        summary['points_collected'] = sum(c['points'] for c in summary['collectors'])
        summary['seconds'] = round(time.monotonic() - started, 3)
        failures = _failures(summary, delivery)
        summary['ok'] = not failures
        LOG.info('[Runner] done in %.1f s: %d collector(s), %d point(s) collected, %d written%s',
                 summary['seconds'], len(self.collectors), summary['points_collected'],
                 summary['points_written'], '' if not failures else f', {len(failures)} failure(s)')
        if failures:
            raise RunFailed('; '.join(failures), summary)
        return summary

    def _run_collector(self, number, collector, dff, delivery):
        label = f'[#{number} {collector.title}]'
        status = {'number': number, 'title': collector.title, 'points': 0,
                  'status': 'ok', 'error': None, 'regions': [], 'identity': None}
        state_key = f'integration_core:last_success:{collector.state_key}'
        interval = getattr(collector, 'min_interval', MIN_INTERVAL.get(collector.category, 0))
        if not (self.debug or self.force):
            age = _last_success_age(dff, state_key)
            if age is not None and age < interval:
                LOG.info('%s skipped: last collection %d s ago is under %d s '
                         '(set INTEGRATION_FORCE=1 or use --force to collect anyway)', label, age, interval)
                status['status'] = 'skipped'
                return status
        try:
            # start() (optional) lets the identity call overlap the first pages.
            getattr(collector, 'start', lambda: None)()
            ident = collector.identity()
        except Exception as e:  # the account as a whole failed: one line, not one per region
            getattr(collector, 'cancel', lambda: None)()
            return _fail(status, label, f'account: {_one_line(e)}')
        status['identity'] = ident
        LOG.info('%s account %s (%s) as %s via %s', label, ident.get('account_id'),
                 ident.get('partition'), ident.get('arn'), ident.get('method'))
        started = time.monotonic()
        failed_before = delivery.failed_points if delivery else 0
        batch = []
        try:
            for point in collector.collect():
                batch.append(point)
                status['points'] += 1
                if len(batch) >= BATCH_SIZE:
                    self._write(delivery, collector.category, batch)
                    batch = []
            self._write(delivery, collector.category, batch)
        except Exception as e:
            LOG.debug('collector traceback:\n%s', traceback.format_exc())
            self._write(delivery, collector.category, batch)
            _fail(status, label, f'collection stopped: {_one_line(e)}')
        for region in getattr(collector, 'results', []):
            status['regions'].append(region)
            if region.get('error'):
                LOG.error('%s %s FAILED: %s', label, region['region'], region['error'])
            else:
                LOG.info('%s %s: %d instance(s), %d page(s), %d API call(s), %.2f s', label,
                         region['region'], region['instances'], region['pages'],
                         region['api_calls'], region['seconds'])
        failed_regions = [r['region'] for r in status['regions'] if r.get('error')]
        if failed_regions and status['status'] == 'ok':
            status['status'] = 'failed'
            status['error'] = f'{len(failed_regions)} region(s) failed: {", ".join(failed_regions)}'
        undelivered = (delivery.failed_points - failed_before) if delivery else 0
        LOG.info('%s %d point(s) in %.2f s%s', label, status['points'], time.monotonic() - started,
                 f', {undelivered} not delivered (spooled or dead-lettered)' if undelivered else '')
        if status['status'] == 'ok' and not undelivered and not self.debug:
            _mark_success(dff, state_key, interval)
        return status

    @staticmethod
    def _write(delivery, category, batch):
        if delivery and batch:
            delivery.write(category, batch)

    def _check(self):
        """The vendor console's "Test" button: identity and each region's access."""
        rows = []
        for number, collector in enumerate(self.collectors, 1):
            try:
                ident = collector.identity()
                rows.append((number, 'identity', 'OK', f"{ident['arn']} via {ident['method']}"))
            except Exception as e:
                rows.append((number, 'identity', 'FAIL', _one_line(e)))
                continue
            for probe in collector.check():
                rows.append((number, probe['region'], 'OK' if probe['ok'] else 'FAIL', probe['reason']))
        _RUNTIME.setdefault('check_rows', []).extend(rows)
        width = max(len(r[1]) for r in rows)
        for number, region, verdict, reason in rows:
            print(f'#{number}  {region:<{width}}  {verdict:<4}  {reason}')
        return {'ok': all(r[2] == 'OK' for r in rows), 'rows': rows}


def _fail(status, label, message):
    LOG.error('%s FAILED: %s', label, message)
    status['status'] = 'failed'
    status['error'] = message
    return status


def _failures(summary, delivery):
    failures = [f"#{c['number']} {c['title']}: {c['error']}"
                for c in summary['collectors'] if c['status'] == 'failed']
    if delivery and delivery.failed_points:
        failures.append(f'{delivery.failed_points} point(s) not delivered: {delivery.last_error}')
    return failures


def _last_success_age(dff, key):
    try:
        raw = dff.CACHE.get(key)
        return time.time() - float(json.loads(raw)['time']) if raw else None
    except Exception as e:  # a broken cache must not stop collection
        LOG.warning('[Runner] cannot read the last collection time: %s', _one_line(e))
        return None


def _mark_success(dff, key, interval):
    try:
        dff.CACHE.set(key, json.dumps({'time': time.time()}), expire=max(1, int(interval)))
    except Exception as e:
        LOG.warning('[Runner] cannot record the collection time: %s', _one_line(e))


def _one_line(error, limit=1000):
    text = ' '.join(str(error).split()) or type(error).__name__
    if len(text) > limit:
        text = text[:limit] + '...'
    return text if isinstance(error, (ConfigError, RunFailed)) else f'{type(error).__name__}: {text}'


def _env_flag(name):
    return os.environ.get(name, '').strip().lower() in ('1', 'true', 'yes', 'on')


# --------------------------------------------------------------------------
# Delivery: batches, spool for what DataKit could not take, dead letters
# --------------------------------------------------------------------------

class Delivery:
    """Writes batches through a DFF connector. What cannot be delivered now is
    spooled to disk and sent first by the next run; points DataKit rejects
    (HTTP 4xx) are narrowed down by halving and kept in a dead-letter file."""

    def __init__(self, connector, datakit_id, spool=None):
        self.connector = connector
        self.spool = spool or Spool(datakit_id)
        self.written = 0
        self.spooled = 0
        self.dead_lettered = 0
        self.failed_points = 0
        self.last_error = None
        self.down = False        # after one unreachable DataKit, spool the rest directly

    def resend_spool(self):
        with self.spool.locked():
            entries = self.spool.entries()
            if entries:
                LOG.info('[Runner] resending %d spooled batch(es) first', len(entries))
            for path, entry in entries:
                try:
                    self._send(entry['category'], entry['points'])
                except DataKitError as e:
                    LOG.warning('[Runner] spooled batches kept for later: %s', e)
                    return
                self.spool.remove(path)

    def write(self, category, points):
        if self.down:
            return self._spool(category, points)
        try:
            self._send(category, points)
        except DataKitError as e:
            self.down = True
            self.last_error = str(e)
            LOG.error('[Runner] %s', e)
            self._spool(category, points)

    def _send(self, category, points):
        """Send; on a 4xx narrow the batch down (halving) to the points DataKit
        rejects and keep those, with its error, in one dead-letter file."""
        rejected = []
        error = self._send_narrowing(category, points, rejected)
        if not rejected:
            return
        self.dead_lettered += len(rejected)
        self.failed_points += len(rejected)
        self.last_error = str(error)
        path = self.spool.dead_letter(category, rejected, error)
        names = [str(p.get('tags', {}).get('name')) for p in rejected]
        LOG.error('[Runner] DataKit rejected %d point(s) (name=%s%s): %s; kept in %s', len(rejected),
                  ', '.join(names[:5]), ', ...' if len(names) > 5 else '', error, path)

    def _send_narrowing(self, category, points, rejected):
        try:
            self.connector.write_by_category_many(category, points)
            self.written += len(points)
            return None
        except Exception as e:
            error = e if isinstance(e, DataKitError) else _as_datakit_error(e)
        if not error.rejected:
            raise error
        if len(points) == 1:
            rejected.extend(points)
            return error
        half = len(points) // 2
        first = self._send_narrowing(category, points[:half], rejected)
        return self._send_narrowing(category, points[half:], rejected) or first

    def _spool(self, category, points):
        path = self.spool.add(category, points)
        self.spooled += len(points)
        self.failed_points += len(points)
        LOG.warning('[Runner] %d point(s) spooled to %s', len(points), path)


def _as_datakit_error(error):
    status = getattr(error, 'status', None) or getattr(error, 'status_code', None)
    return DataKitError(status if isinstance(status, int) else None, _one_line(error))


class Spool:
    """Batches on disk, one JSON file each, written atomically with mode 0600."""

    def __init__(self, datakit_id, root=None):
        base = root or state_dir()
        self.dir = os.path.join(base, 'spool', _safe_name(datakit_id))
        self.dead_dir = os.path.join(base, 'deadletter', _safe_name(datakit_id))

    @contextlib.contextmanager
    def locked(self):
        """One resend at a time: a second run waits, then finds the files gone."""
        _makedirs(self.dir)
        with open(os.path.join(self.dir, '.lock'), 'a') as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def entries(self):
        out = []
        for name in sorted(os.listdir(self.dir)):
            if name.startswith('.tmp-'):
                _remove_stale(os.path.join(self.dir, name))
            if not name.endswith('.json'):
                continue
            path = os.path.join(self.dir, name)
            try:
                with open(path, encoding='utf-8') as f:
                    out.append((path, json.load(f)))
            except (OSError, ValueError) as e:
                LOG.error('[Runner] unreadable spool file %s left in place: %s', path, e)
        return out

    def add(self, category, points):
        name = f'{time.time_ns()}-{uuid.uuid4().hex[:8]}.json'
        return atomic_write(os.path.join(self.dir, name),
                            json.dumps({'category': category, 'points': points}, default=str))

    def remove(self, path):
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)

    def dead_letter(self, category, points, error):
        name = f'{time.time_ns()}-{uuid.uuid4().hex[:8]}.json'
        body = {'category': category, 'status': error.status, 'error': error.body, 'points': points}
        return atomic_write(os.path.join(self.dead_dir, name), json.dumps(body, default=str))


# --------------------------------------------------------------------------
# DataKit HTTP client (the local DFF.SRC) and line protocol
# --------------------------------------------------------------------------

class DataKitClient:
    """POST /v1/write/<category>?input=...&precision=ns with the write methods of
    Func's DataKit connector; each returns (status, body) and raises on >= 400."""

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
        return self._post(category, '\n'.join(encode_points(data)).encode('utf-8'))

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
                with urllib.request.urlopen(request, timeout=self.timeout) as resp:
                    return resp.status, resp.read().decode('utf-8', 'replace')
            except urllib.error.HTTPError as e:
                text = e.read().decode('utf-8', 'replace')[:2000]
                error = DataKitError(e.code, _datakit_message(text) or e.reason)
                if error.rejected:
                    raise error from None
                retry_after = e.headers.get('Retry-After')
            except (urllib.error.URLError, OSError) as e:
                reason = getattr(e, 'reason', e)
                error = DataKitError(None, f'{self.url}: {reason}')
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
        for line in encode_points(data):
            self.stream.write(line + '\n')
        self.stream.flush()
        return 200, ''

    def write_by_category(self, category, measurement, tags=None, fields=None, timestamp=None):
        return self.write_by_category_many(category, [
            {'measurement': measurement, 'tags': tags, 'fields': fields, 'timestamp': timestamp}])


def encode_points(data):
    """Line protocol for a batch; a point that cannot be encoded is InvalidPoint
    (so Delivery narrows the batch to it instead of spooling it forever)."""
    lines = []
    for point in data:
        try:
            lines.append(to_line_protocol(point))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            name = (point.get('tags') or {}).get('name') if isinstance(point, dict) else None
            raise InvalidPoint(f'name={name}: {e}') from None
    return lines


def to_line_protocol(point):
    """One point as InfluxDB 1.x line protocol (nanosecond timestamp).
    Newlines cannot appear in names or tag values: they become spaces; empty tag
    values are omitted; a value that cannot be a field is an error."""
    measurement = _lp_name(point['measurement'], ', ')
    if not measurement:
        raise ValueError('a point needs a measurement')
    tags = []
    for key, value in sorted((point.get('tags') or {}).items()):
        key, value = _lp_name(key, ',= '), _lp_name(value, ',= ')
        if key and value:
            tags.append(f'{key}={value}')
    fields = []
    for key, value in (point.get('fields') or {}).items():
        if value is None:
            continue
        fields.append(f'{_lp_name(key, ",= ")}={_lp_field(key, value)}')
    if not fields:
        raise ValueError(f"point {point.get('tags', {}).get('name', '')!r} has no fields")
    line = measurement + ''.join(',' + t for t in tags) + ' ' + ','.join(fields)
    timestamp = point.get('timestamp')
    if timestamp is not None:
        line += f' {_lp_timestamp(timestamp)}'
    return line


_LP_PLAIN = re.compile(r'[^\\,= \n\r]*')


def _lp_name(value, specials):
    text = str(value)
    if _LP_PLAIN.fullmatch(text):
        return text          # the common case: nothing to escape
    text = text.replace('\r\n', ' ').replace('\n', ' ').replace('\r', ' ')
    # A backslash before a special character or at the end would escape it.
    text = text.rstrip('\\')
    out = []
    for index, char in enumerate(text):
        if char == '\\' and index + 1 < len(text) and text[index + 1] in specials:
            out.append('\\\\')
        elif char in specials:
            out.append('\\' + char)
        else:
            out.append(char)
    return ''.join(out)


def _lp_field(key, value):
    if isinstance(value, bool):
        return 'true' if value else 'false'
    if isinstance(value, int):
        return f'{value}i'
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f'field {key!r} is {value}: line protocol has no NaN or infinity')
        return repr(value)
    if not isinstance(value, str):
        value = json.dumps(value, ensure_ascii=False, default=str)
    return '"' + value.replace('\\', '\\\\').replace('"', '\\"') + '"'


def _lp_timestamp(value):
    """Seconds, milliseconds or nanoseconds (by magnitude), or a datetime -> ns."""
    if isinstance(value, datetime.datetime):
        return int(value.timestamp() * 1e9)
    if isinstance(value, int) and value >= 1e14:
        return value          # already nanoseconds; a float would lose the last digits
    value = float(value)
    if value < 1e11:
        return int(value * 1e9)
    if value < 1e14:
        return int(value * 1e6)
    return int(value)


# --------------------------------------------------------------------------
# DFF: Func's, or the local stand-in
# --------------------------------------------------------------------------

_RUNTIME = {}   # the local runtime's state: 'dff', 'mode' ('run' or 'check')


def current_dff():
    """Func's DFF when running inside Func (it injects a global), else the local
    runtime's stand-in, created on first use."""
    dff = globals().get('DFF') or getattr(builtins, 'DFF', None)
    if dff is not None:
        return dff
    if 'dff' not in _RUNTIME:
        _RUNTIME['dff'] = LocalDFF()
    return _RUNTIME['dff']


def default_cache():
    """The cache collectors keep credentials in: DFF.CACHE, Func's or ours."""
    return current_dff().CACHE


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
    """DFF.CACHE on disk: string values, expiry honoured, files of mode 0600
    named by a hash of the key."""

    def __init__(self, root=None, clock=time.time):
        self.dir = os.path.join(root or state_dir(), 'cache')
        self.clock = clock

    def _path(self, key, scope=None):
        digest = hashlib.sha256(f'{scope or ""}\0{key}'.encode()).hexdigest()
        return os.path.join(self.dir, digest + '.json')

    def get(self, key, scope=None):
        try:
            with open(self._path(key, scope), encoding='utf-8') as f:
                entry = json.load(f)
        except (FileNotFoundError, ValueError):
            return None
        if entry.get('expires') is not None and entry['expires'] <= self.clock():
            self.delete(key, scope)
            return None
        return entry['value']

    def set(self, key, value, scope=None, expire=None):
        expires = self.clock() + expire if expire else None
        atomic_write(self._path(key, scope), json.dumps({'value': str(value), 'expires': expires}))

    def delete(self, key, scope=None):
        with contextlib.suppress(FileNotFoundError):
            os.remove(self._path(key, scope))

    def expire(self, key, seconds, scope=None):
        value = self.get(key, scope)
        if value is not None:
            self.set(key, value, scope, expire=seconds)


def state_dir():
    """$INTEGRATION_STATE_DIR, else ~/.cache/dataflux-integration, else (a home
    that cannot be written, as in some containers) a private folder in /tmp."""
    configured = os.environ.get('INTEGRATION_STATE_DIR')
    if configured:
        return configured
    home = os.path.join(os.path.expanduser('~'), '.cache', 'dataflux-integration')
    try:
        _makedirs(home)
        return home
    except OSError:
        return os.path.join(tempfile.gettempdir(), f'dataflux-integration-{os.getuid()}')


def atomic_write(path, text):
    """Write-then-rename with fsync: a kill leaves the old file or the new one."""
    directory = os.path.dirname(path)
    _makedirs(directory)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix='.tmp-')
    try:
        with os.fdopen(fd, 'w', encoding='utf-8') as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    return path


def _remove_stale(path, age=3600):
    """A temporary file an interrupted atomic_write left behind."""
    with contextlib.suppress(OSError):
        if time.time() - os.path.getmtime(path) > age:
            os.remove(path)


def _makedirs(directory):
    os.makedirs(directory, mode=0o700, exist_ok=True)


def _safe_name(text):
    return ''.join(c if c.isalnum() or c in '-_' else '_' for c in str(text)) or 'default'


# --------------------------------------------------------------------------
# Logging
# --------------------------------------------------------------------------

def quiet_sdk_loggers():
    """botocore's DEBUG log prints STS answers, temporary secrets included."""
    for name in ('botocore', 'boto3', 'urllib3', 's3transfer'):
        logging.getLogger(name).setLevel(logging.WARNING)


class _StdoutHandler(logging.StreamHandler):
    """Writes to whatever sys.stdout is now (Func and test runners swap it)."""

    def __init__(self):
        super().__init__()
        self.setFormatter(logging.Formatter('[%(levelname)s] %(message)s'))

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value):
        pass


def _attach_stdout_handler(logger):
    if not any(isinstance(h, _StdoutHandler) for h in logger.handlers):
        logger.addHandler(_StdoutHandler())


@contextlib.contextmanager
def log_to_stdout():
    """Func's task log is what a script prints: send our log lines there.
    Outside Func, only when the application did not configure logging itself."""
    root = logging.getLogger('integration')
    in_func = (globals().get('DFF') or getattr(builtins, 'DFF', None)) is not None
    if root.handlers or (logging.getLogger().handlers and not in_func):
        yield
        return
    _attach_stdout_handler(root)
    if root.level == logging.NOTSET:
        root.setLevel(logging.INFO)
    try:
        yield
    finally:
        root.handlers = [h for h in root.handlers if not isinstance(h, _StdoutHandler)]


# --------------------------------------------------------------------------
# The command line: run, serve, check, demo
# --------------------------------------------------------------------------

def main(argv=None):
    parser = _parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose)
    try:
        return args.handler(args)
    except ConfigError as e:
        print(f'error: {e}', file=sys.stderr)
        if args.verbose > 1:
            traceback.print_exc()
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


class _ArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line, like every other mistake."""

    def error(self, message):
        self.exit(EXIT_USAGE, f'error: {message} (see {self.prog} --help)\n')


def _parser():
    parser = _ArgumentParser(
        prog='integration-runner',
        description='Run DataFlux Func startup scripts of the integration set on this machine.')
    sub = parser.add_subparsers(dest='command', required=True)

    def command(name, handler, help_text, script=True):
        p = sub.add_parser(name, help=help_text, description=help_text)
        if script:
            p.add_argument('script', help='a startup script, as pasted into Func')
            p.add_argument('--func', help='the @DFF.API function to run (default: every one)')
        p.add_argument('-v', '--verbose', action='count', default=0,
                       help='more log (-vv also shows tracebacks); never secrets')
        p.set_defaults(handler=handler)
        return p

    run = command('run', _cmd_run, 'run the script\'s @DFF.API function(s) once')
    _add_target(run)
    run.add_argument('--force', action='store_true',
                     help='collect even if the last collection is under 15 minutes old')
    serve = command('serve', _cmd_serve, 'run each @DFF.API function on its fixed_crontab')
    _add_target(serve)
    command('check', _cmd_check, 'show the identity and each region\'s access; write nothing')
    command('demo', _cmd_demo, 'run the four startup scripts against an embedded AWS emulator',
            script=False)
    return parser


def _add_target(p):
    target = p.add_mutually_exclusive_group()
    target.add_argument('--datakit', metavar='URL',
                        help=f'DataKit to write to (default $DATAKIT_URL or {DEFAULT_DATAKIT_URL})')
    target.add_argument('--output', metavar='-|FILE', help='print line protocol instead of writing')


def _setup_logging(verbose):
    root = logging.getLogger('integration')
    _attach_stdout_handler(root)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    quiet_sdk_loggers()


def load_script(path, dff):
    """Exec a startup script as Func would: DFF a global, its siblings importable."""
    if not os.path.isfile(path):
        raise ConfigError(f'{path}: no such startup script')
    with open(path, encoding='utf-8') as f:
        source = f.read()
    for directory in (os.path.dirname(os.path.abspath(__file__)),
                      os.path.dirname(os.path.abspath(path))):
        if directory not in sys.path:
            sys.path.insert(0, directory)
    try:
        code = compile(source, path, 'exec')
    except SyntaxError as e:
        raise ConfigError(f'{path}:{e.lineno}: syntax error: {e.msg}') from None
    namespace = {'DFF': dff, '__name__': '__dff_script__', '__file__': path}
    _RUNTIME['dff'] = dff
    try:
        exec(code, namespace)
    except ConfigError as e:
        raise ConfigError(f'{path}: {e}') from None
    except Exception as e:
        raise ConfigError(f'{path}: the script failed while loading: {_one_line(e)} '
                          f'(line {_script_line(e, path)}); fix it and run again') from None
    if not dff.apis:
        raise ConfigError(f'{path}: no function decorated with @DFF.API(...): nothing to run')
    return dff.apis


def _script_line(error, path):
    for frame in reversed(traceback.extract_tb(error.__traceback__)):
        if frame.filename == path:
            return frame.lineno
    return '?'


def _select(apis, name, path):
    if not name:
        return apis
    chosen = [a for a in apis if a['name'] == name]
    if not chosen:
        raise ConfigError(f'{path}: no @DFF.API function named {name!r}; it has: '
                          + ', '.join(a['name'] for a in apis))
    return chosen


def _local_dff(args):
    url = getattr(args, 'datakit', None)
    if url is not None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ('http', 'https') or not parts.netloc:
            raise ConfigError(f'--datakit {url!r} is not a URL: give DataKit\'s address, '
                              f'e.g. {DEFAULT_DATAKIT_URL}')
    output = None
    if getattr(args, 'output', None):
        output = (LineProtocolWriter(sys.stdout, 'stdout') if args.output == '-'
                  else LineProtocolWriter(open(args.output, 'a', encoding='utf-8'), args.output))
    return LocalDFF(datakit_url=getattr(args, 'datakit', None), output=output)


def _cmd_run(args):
    _RUNTIME['force'] = args.force
    dff = _local_dff(args)
    apis = _select(load_script(args.script, dff), args.func, args.script)
    status = EXIT_OK
    with _script_lock(args.script):
        for api in apis:
            status = max(status, run_api(api, verbose=args.verbose))
    return status


def run_api(api, verbose=0):
    """Run one @DFF.API function with its timeout; the exit status it earns."""
    LOG.info('[Func] %s: %s()', api['title'], api['name'])
    try:
        with _alarm(api['timeout']):
            api['func']()
    except JobTimeout:
        LOG.error('[Func] %s: stopped after its timeout of %d s', api['title'], api['timeout'])
        return EXIT_FAILED
    except RunFailed as e:
        LOG.error('[Func] %s failed: %s', api['title'], e)
        return EXIT_FAILED
    except ConfigError as e:
        print(f"error: {api['title']}: {e}", file=sys.stderr)
        if verbose > 1:
            traceback.print_exc()
        return EXIT_USAGE
    except Exception as e:
        LOG.error('[Func] %s failed: %s', api['title'], _one_line(e))
        if verbose > 1:
            traceback.print_exc()
        return EXIT_FAILED
    return EXIT_OK


@contextlib.contextmanager
def _alarm(seconds):
    """Func kills a run past its timeout; SIGALRM does the same here."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum, frame):
        raise JobTimeout()
    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(int(seconds))
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@contextlib.contextmanager
def _script_lock(path):
    """Two runs of one script at once: the second waits for the first."""
    digest = hashlib.sha256(os.path.abspath(path).encode()).hexdigest()[:16]
    lock_path = os.path.join(state_dir(), 'locks', digest + '.lock')
    _makedirs(os.path.dirname(lock_path))
    with open(lock_path, 'a') as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            LOG.warning('[Func] another run of %s is in progress; waiting for it', path)
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _cmd_check(args):
    dff = _local_dff(args)
    apis = _select(load_script(args.script, dff), args.func, args.script)
    _RUNTIME['mode'] = 'check'
    try:
        for api in apis:
            LOG.info('[Func] %s: checking', api['title'])
            api['func']()
    finally:
        _RUNTIME.pop('mode', None)
    rows = _RUNTIME.pop('check_rows', [])
    return EXIT_OK if rows and all(r[2] == 'OK' for r in rows) else EXIT_FAILED


def _cmd_serve(args, clock=time.time, stop=None):
    dff = _local_dff(args)
    apis = _select(load_script(args.script, dff), args.func, args.script)
    for api in apis:
        if not api['fixed_crontab']:
            raise ConfigError(f"{args.script}: @DFF.API({api['title']!r}) has no fixed_crontab to serve")
    return Scheduler(apis, verbose=args.verbose, clock=clock, stop=stop).serve()


class Scheduler:
    """Func's scheduling: each job on its crontab, matched once a minute; a job
    whose previous run is still going is skipped; a run past its timeout is
    killed. Each run is a child process, so a hung run cannot hang the rest."""

    def __init__(self, apis, verbose=0, clock=time.time, stop=None, tick=1.0, grace=30.0):
        import croniter
        self.apis = apis
        self.verbose = verbose
        self.clock = clock
        self.stop = stop or threading.Event()
        self.tick = tick
        self.grace = grace
        self.running = {}
        self.next_fire = {}
        self.croniter = croniter.croniter
        self.history = []   # (name, event) for tests and the log

    def serve(self):
        previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                previous[sig] = signal.signal(sig, lambda *_: self.stop.set())
        for api in self.apis:
            self.next_fire[api['name']] = self._next(api, self.clock())
            LOG.info('[serve] %s: %s, next run at %s', api['title'], api['fixed_crontab'],
                     _fmt_epoch(self.next_fire[api['name']]))
        try:
            while not self.stop.is_set():
                now = self.clock()
                self._reap()
                for api in self.apis:
                    if now >= self.next_fire[api['name']]:
                        self.next_fire[api['name']] = self._next(api, now)
                        self._fire(api, now)
                self.stop.wait(self.tick)
        finally:
            self._drain()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return EXIT_OK

    def _drain(self):
        """Stopping: let running jobs finish (up to `grace` seconds), like a
        worker shutting down warm, then terminate what is left."""
        LOG.info('[serve] stopping%s', f', waiting up to {self.grace:g} s for '
                 f'{len(self.running)} running job(s)' if self.running else '')
        deadline = time.monotonic() + self.grace
        for name, (proc, _) in self.running.items():
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                LOG.warning('[serve] %s: still running; terminating it', name)
                proc.terminate()
                proc.join(10)

    def _next(self, api, now):
        return self.croniter(api['fixed_crontab'], now).get_next(float)

    def _fire(self, api, now):
        import multiprocessing
        name = api['name']
        if name in self.running:
            LOG.warning('[serve] %s: previous run not finished; skipping this tick', api['title'])
            self.history.append((name, 'skipped'))
            return
        proc = multiprocessing.get_context('fork').Process(
            target=_child_run, args=(api, self.verbose), daemon=True)
        proc.start()
        # A duration, so measured on the monotonic clock, not the schedule's.
        self.running[name] = (proc, time.monotonic() + api['timeout'])
        self.history.append((name, 'started'))

    def _reap(self):
        now = time.monotonic()
        for name, (proc, deadline) in list(self.running.items()):
            if not proc.is_alive():
                proc.join()
                self.history.append((name, f'exit {proc.exitcode}'))
                del self.running[name]
            elif now > deadline:
                LOG.error('[serve] %s: killed after its timeout', name)
                proc.kill()
                proc.join()
                self.history.append((name, 'killed'))
                del self.running[name]


def _child_run(api, verbose):
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    sys.exit(run_api(api, verbose))


def _fmt_epoch(value):
    return datetime.datetime.fromtimestamp(value).strftime('%Y-%m-%d %H:%M:%S')


def _cmd_demo(args):
    try:
        import demo_emulator
    except ImportError as e:
        raise ConfigError(f'the demo needs the emulator: pip install ".[demo]" ({e})') from None
    return demo_emulator.run_demo(verbose=args.verbose)


if __name__ == '__main__':
    # Run as the importable module, so startup scripts that import
    # integration_core__runner share our state instead of a second copy.
    import integration_core__runner
    sys.exit(integration_core__runner.main())
