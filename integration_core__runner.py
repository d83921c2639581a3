"""The core of the integration set: the Runner and DataKit delivery. Pasted
into DataFlux Func as the script `integration_core__runner`.

Public entry points
    Runner(collector_or_list, debug=False, datakit_id='datakit', force=None).run()
        Runs collectors in list order and writes their points to DataKit through
        DFF.SRC(datakit_id).write_by_category_many(category, batch), 100 points a
        call. Returns a summary; raises RunFailed after everything was delivered
        when anything failed, so Func marks the task failed.

What a collector gives the Runner (integration_aws_ec2__main.DataCollector does)
    title, category ('custom_object' or 'metric'), min_interval (seconds),
    state_key (str), optional start() and cancel() (begin collecting before the
    identity call; stop when the account fails or the run ends early),
    identity() -> {'method', 'account_id', 'arn', 'partition'},
    collect() -> iterator of {'measurement', 'tags', 'fields', 'timestamp'},
    results (after collect: one dict per region with 'region', 'instances',
    'pages', 'api_calls', 'seconds', 'error'), check() -> [{'region', 'ok', 'reason'}].

Inside Func the real DFF is used, and every log line of a run, worker threads'
included, goes to the task log through Func's print (the only thing its task
log shows). Outside Func the local runtime (the `integration_local` package,
never pasted: `integration-runner run|serve|check|demo`) provides DFF and the
same lines go to the console.

What outlives a Func task: DFF.CACHE (Func's Redis: the last collection time,
and the credentials cache of integration_aws__auth) and the spool files on the
worker's disk. Module globals do not: Func runs every module body again in
every task.

Environment (or, inside Func, a Func environment variable of the same name)
    INTEGRATION_FORCE=1     collect even when the last collection is fresh.
    INTEGRATION_STATE_DIR   spool and dead letters (~/.cache/dataflux-integration).
"""
import contextlib
import datetime
import fcntl
import hashlib
import json
import logging
import math
import os
import queue
import re
import socket
import tempfile
import threading
import time
import traceback
import uuid
import weakref
from concurrent.futures import Future

LOG = logging.getLogger('integration.core')

BATCH_SIZE = 100                 # what Func's own DataKit helper sends per request
MIN_INTERVAL = {'custom_object': 900, 'object': 900, 'metric': 60}
LOG_FORMAT = '[%(levelname)s] %(message)s'


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
    def kind(self):
        """What the answer means for the points:
        'points'    400 (DataKit's "invalid point") or 413 (body too large):
                    these points; halving the batch finds the ones to keep aside.
        'transient' unreachable, 408, 429 or 5xx: try again later.
        'config'    any other answer (401, 403, 404, 405, a 3xx, ...): the URL,
                    the token or the connector is wrong; no point is at fault."""
        if self.status is None or self.status in (408, 429) or self.status >= 500:
            return 'transient'
        if self.status in (400, 413):
            return 'points'
        return 'config'

    @property
    def rejected(self):
        """DataKit refused these points themselves; sending them again won't help."""
        return self.kind == 'points'


class InvalidPoint(DataKitError):
    """A point that cannot be line protocol (no fields, NaN, no measurement):
    never sent, and, like a point DataKit rejects, kept as a dead letter."""
    kind = 'points'
    rejected = True

    def __init__(self, message):
        Exception.__init__(self, f'invalid point: {message}')
        self.status = None
        self.body = message


# --------------------------------------------------------------------------
# The Runner
# --------------------------------------------------------------------------

class Runner:
    """Run collectors in order; write, report and fail loudly, never partially."""

    def __init__(self, collector_or_list, debug=False, datakit_id='datakit', force=None, *,
                 clock=time.time):
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
        self.force = force
        self.clock = clock

    def run(self):
        dff = current_dff()
        quiet_sdk_loggers()
        with task_log():
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
        force = self.force if self.force is not None else force_requested(dff)
        for number, collector in enumerate(self.collectors, 1):
            summary['collectors'].append(self._run_collector(number, collector, dff, delivery, force))
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

    def _run_collector(self, number, collector, dff, delivery, force):
        label = f'[#{number} {collector.title}]'
        status = {'number': number, 'title': collector.title, 'points': 0,
                  'status': 'ok', 'error': None, 'regions': [], 'identity': None}
        # Everything that changes what is written: the collector's own key
        # (account, regions, options, tags, hooks) and where it is written.
        state_key = (f'integration_core:last_success:{collector.state_key}:'
                     f'{fingerprint(self.datakit_id)}')
        interval = getattr(collector, 'min_interval', MIN_INTERVAL.get(collector.category, 0))
        started_at = self.clock()
        if not (self.debug or force):
            age = _last_success_age(dff, state_key, started_at)
            if age is not None and age < interval - schedule_grace(interval):
                LOG.info('%s skipped: the last collection started %d s ago, under %d s '
                         '(set INTEGRATION_FORCE=1 or use --force to collect anyway)',
                         label, age, interval)
                status['status'] = 'skipped'
                return status
        cancel = getattr(collector, 'cancel', lambda: None)
        identified = False
        try:
            # start() (optional) lets the identity call overlap the first pages.
            getattr(collector, 'start', lambda: None)()
            ident = collector.identity()
            identified = True
        except Exception as e:  # the account as a whole failed: one line, not one per region
            return _fail(status, label, f'account: {_one_line(e)}')
        finally:
            # Also on Func's timeout, which no `except Exception` sees: the
            # collector's threads must stop calling AWS when the task ends.
            if not identified:
                cancel()
        status['identity'] = ident
        LOG.info('%s account %s (%s) as %s via %s', label, ident.get('account_id'),
                 ident.get('partition'), ident.get('arn'), ident.get('method'))
        started = time.monotonic()
        failed_before = delivery.failed_points if delivery else 0
        batch = []
        points = collector.collect()
        try:
            for point in points:
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
        finally:
            # A timeout raised while we were writing leaves the generator
            # suspended: close it now so its threads stop, not at GC time.
            getattr(points, 'close', lambda: None)()
            cancel()
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
            _mark_success(dff, state_key, interval, started_at)
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


def schedule_grace(interval):
    """How much earlier than `interval` a start may come and still collect.

    The record is when the last successful collection *started*, so a run's
    own length never delays the next one; the grace absorbs Func starting a
    tick late (queueing, a busy worker) and an earlier tick early. On a */15
    schedule every tick collects; a second trigger or a manual run within
    13 minutes of the last start is skipped. A quarter of the interval, at
    most 2 minutes: 15 s for metrics collected every minute."""
    return min(interval / 4.0, 120.0)


def _last_success_age(dff, key, now):
    try:
        raw = dff.CACHE.get(key)
        return now - float(json.loads(raw)['started']) if raw else None
    except Exception as e:  # a broken or foreign record must not stop collection
        LOG.warning('[Runner] ignoring an unreadable last-collection record: %s', _one_line(e))
        return None


def _mark_success(dff, key, interval, started_at):
    try:
        dff.CACHE.set(key, json.dumps({'started': started_at}), expires=max(1, int(interval)))
    except Exception as e:
        LOG.warning('[Runner] cannot record the collection time: %s', _one_line(e))


def fingerprint(*parts):
    """A short stable hash of values that decide a collection's output, for
    cache keys: dicts, lists, strings, numbers and functions (a function by
    its name, code and constants, so two lambdas that differ differ here)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=_describe).encode()).hexdigest()[:24]


def _describe(value):
    code = getattr(value, '__code__', None)
    if code is not None:
        closure = [c.cell_contents for c in (getattr(value, '__closure__', None) or ())
                   if _plain(c)]
        return ['function', getattr(value, '__qualname__', ''), _code_signature(code),
                repr(closure)]
    if isinstance(value, (set, frozenset)):
        return sorted(map(repr, value))
    # Never repr() an arbitrary object: it holds an address, new every task.
    return ['object', type(value).__module__, type(value).__qualname__]


def _code_signature(code):
    return [code.co_code.hex(), [_code_signature(c) if hasattr(c, 'co_code') else repr(c)
                                 for c in code.co_consts]]


def _plain(cell):
    try:
        return isinstance(cell.cell_contents, (str, int, float, bool, type(None), list, dict, tuple))
    except ValueError:   # an empty cell
        return False


def _one_line(error, limit=1000):
    text = ' '.join(str(error).split()) or type(error).__name__
    if len(text) > limit:
        text = text[:limit] + '...'
    return text if isinstance(error, (ConfigError, RunFailed)) else f'{type(error).__name__}: {text}'


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

_RUNTIME = {}   # set by the local runtime only: 'dff', 'mode' ('run' or 'check'), 'force'


def in_func():
    """Func injects DFF as a global into every script it loads, this one too."""
    return 'DFF' in globals()


def current_dff():
    """Func's DFF inside Func, else the local runtime's stand-in."""
    if in_func():
        return globals()['DFF']
    dff = _RUNTIME.get('dff')
    if dff is None:
        raise ConfigError('there is no DFF here: run the startup script inside DataFlux Func, '
                          'or on this machine with `integration-runner run SCRIPT`')
    return dff


def default_cache():
    """The cache collectors keep credentials in: DFF.CACHE, Func's or the local
    runtime's; for a program that uses the modules as a library without
    either, one in memory for the life of the process."""
    if in_func() or _RUNTIME.get('dff') is not None:
        return current_dff().CACHE
    return _RUNTIME.setdefault('memory_cache', MemoryCache())


class MemoryCache:
    """DFF.CACHE's get/set/delete in memory (string values, expiry honoured)."""

    def __init__(self, clock=time.time):
        self._entries = {}
        self._clock = clock

    def get(self, key, scope=None):
        value, expires = self._entries.get((scope, key), (None, None))
        if expires is not None and expires <= self._clock():
            self.delete(key, scope)
            return None
        return value

    def set(self, key, value, scope=None, expires=None, expire=None):
        seconds = expires or expire
        self._entries[(scope, key)] = (str(value), self._clock() + seconds if seconds else None)

    def delete(self, key, scope=None):
        self._entries.pop((scope, key), None)


def force_requested(dff):
    """INTEGRATION_FORCE from the process environment or, inside Func, from a
    Func environment variable (DFF.ENV casts it to a bool, a number or text)."""
    values = [_RUNTIME.get('force'), os.environ.get('INTEGRATION_FORCE')]
    if in_func():
        try:
            values.append(dff.ENV('INTEGRATION_FORCE'))
        except Exception as e:   # an unreadable variable must not stop collection
            LOG.warning('[Runner] cannot read the Func environment variable INTEGRATION_FORCE: %s',
                        _one_line(e))
    return any(_truthy(v) for v in values)


def _truthy(value):
    if isinstance(value, str):
        return value.strip().lower() in ('1', 'true', 'yes', 'on')
    return value is not None and bool(value)


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
    finally:
        # Any exit before the rename, a Func timeout included, leaves no temp file.
        with contextlib.suppress(OSError):
            os.remove(tmp)
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
# What collectors share: stopping their threads, validating their options
# --------------------------------------------------------------------------

STOP_GRACE = 2.0      # seconds a stopped collection waits for its threads to end


def in_background(func, *args, **kwargs):
    """func(*args, **kwargs) in a thread of its own; a Future of its result.
    The future is always settled, so whoever waits on it never hangs."""
    future = Future()

    def call():
        try:
            future.set_result(func(*args, **kwargs))
        except Exception as e:
            future.set_exception(e)
        finally:
            if not future.done():   # SystemExit and the like: still an answer
                future.set_exception(RuntimeError(f'{callable_name(func)} was interrupted'))
    threading.Thread(target=call, name='integration-identity', daemon=True).start()
    return future


class Cancelled(Exception):
    """Raised inside a watched client once its collection was stopped."""


class Cancellation:
    """Ends a collection's AWS traffic when the run ends early (Func's timeout,
    an account that failed, an exception anywhere). Threads cannot be killed,
    so every client it watches refuses to send or retry once cancelled, and
    the sockets of requests in flight are shut down, so a slow endpoint
    cannot hold a thread until its read timeout."""

    def __init__(self):
        self._event = threading.Event()
        self._connections = weakref.WeakSet()

    def is_set(self):
        return self._event.is_set()

    def watch(self, client):
        events = client.meta.events
        events.register_first('before-send', self._refuse)
        events.register_first('needs-retry', self._refuse)
        # botocore keeps its connection pool classes in a per-client dict;
        # subclasses of them note each connection they open. Private API:
        # without it, cancelling still stops new requests and retries.
        http = getattr(getattr(client, '_endpoint', None), 'http_session', None)
        pools = getattr(http, '_pool_classes_by_scheme', None)
        if isinstance(pools, dict):
            for scheme, base in list(pools.items()):
                pools[scheme] = self._noting_pool(base)
        return client

    def cancel(self):
        self._event.set()
        for connection in list(self._connections):
            sock = getattr(connection, 'sock', None)
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def _refuse(self, **_):
        if self._event.is_set():
            raise Cancelled('the run ended; request not sent')

    def _noting_pool(self, base):
        connections = self._connections

        class NotingPool(base):
            def _new_conn(self):
                connection = super()._new_conn()
                connections.add(connection)
                return connection
        return NotingPool


class Workers:
    """A fixed pool of daemon threads. Unlike ThreadPoolExecutor, nothing
    joins them at interpreter exit, and stop() waits a bounded time."""

    def __init__(self, count, name):
        self._tasks = queue.Queue()
        self._threads = [threading.Thread(target=self._work, name=f'integration-{name}-{i}',
                                          daemon=True) for i in range(count)]
        for thread in self._threads:
            thread.start()

    def submit(self, func, *args):
        self._tasks.put((func, args))

    def _work(self):
        while True:
            task = self._tasks.get()
            if task is None:
                return
            func, args = task
            func(*args)

    def stop(self, timeout):
        for _ in self._threads:
            self._tasks.put(None)
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))


def check_int(configs, key, low, high, where):
    value = configs.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(f'{where}[{key!r}] must be a whole number from {low} to {high} '
                               f'(got {value!r})')


def check_filters(filters):
    if filters is None:
        return []
    if callable(filters):
        filters = [filters]
    if not isinstance(filters, (list, tuple)):
        raise ConfigError(f'filters must be a list of functions, not {type(filters).__name__}')
    for index, check in enumerate(filters):
        if not callable(check):
            raise ConfigError(f'filters[{index}] must be a function taking an instance\'s '
                                   f'tags and fields and returning True to keep it, '
                                   f'not {type(check).__name__}')
    return list(filters)


def first_line(error, limit=300):
    """Some botocore errors carry the whole response body: keep a line of it."""
    text = (str(error).strip().splitlines() or [''])[0]
    return text if len(text) <= limit else text[:limit] + '...'


def callable_name(func):
    return getattr(func, '__name__', type(func).__name__)


# --------------------------------------------------------------------------
# Logging
# --------------------------------------------------------------------------

def quiet_sdk_loggers():
    """botocore's DEBUG log prints STS answers, temporary secrets included."""
    for name in ('botocore', 'boto3', 'urllib3', 's3transfer'):
        logging.getLogger(name).setLevel(logging.WARNING)


class PrintHandler(logging.Handler):
    """Sends each record to `print`. Inside Func that name is Func's own print,
    the only way into the task log, and it works from any thread; elsewhere
    it is the console."""

    marker = 'integration_task_log'

    def __init__(self, level=logging.NOTSET):
        super().__init__(level)
        self.setFormatter(logging.Formatter(LOG_FORMAT))
        setattr(self, self.marker, True)

    def emit(self, record):
        try:
            print(self.format(record))
        except Exception:
            self.handleError(record)


def _ours(handler):
    # By marker, not class: Func runs this module again in every task, so a
    # handler a killed task left behind is of another class object.
    return getattr(handler, PrintHandler.marker, False)


@contextlib.contextmanager
def task_log():
    """Route the run's log lines (the `integration` loggers) to print for the
    length of the run. Inside Func always, and only there (Func would send
    `logging` output to the worker's own stdout, which users never see).
    Outside Func, unless the application configured logging itself."""
    root = logging.getLogger('integration')
    if not in_func() and (root.handlers or logging.getLogger().handlers):
        yield
        return
    saved = root.handlers[:], root.level, root.propagate
    root.handlers = [h for h in root.handlers if not _ours(h)] + [PrintHandler()]
    if in_func():
        root.propagate = False
        root.setLevel(logging.INFO)
    elif root.level == logging.NOTSET:
        root.setLevel(logging.INFO)
    try:
        yield
    finally:
        root.handlers, root.level, root.propagate = saved
        root.handlers = [h for h in root.handlers if not _ours(h)]


if __name__ == '__main__':
    # `python -m integration_core__runner ...`: the local runtime's command
    # line. (Inside Func __name__ is the script id, so this never runs there.)
    import sys
    from integration_local.cli import main
    sys.exit(main())
