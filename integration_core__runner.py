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
    state_key (str), optional freshness_key (str: the skip rule's, when not
    state_key), optional start() and cancel() (begin collecting before the
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
    INTEGRATION_SPOOL_MAX_MB, INTEGRATION_SPOOL_MAX_DAYS (256, 7),
    INTEGRATION_DEADLETTER_MAX_MB, INTEGRATION_DEADLETTER_MAX_DAYS (64, 30)
                            what the spool and the dead letters may keep (Spool).
Environment (the process's only)
    INTEGRATION_STATE_DIR   spool and dead letters (~/.cache/dataflux-integration;
                            it must be ours and closed to others: state_dir()).
"""
import base64
import collections
import contextlib
import datetime
import decimal
import difflib
import fcntl
import hashlib
import json
import logging
import math
import os
import queue
import re
import signal
import socket
import stat
import tempfile
import threading
import time
import traceback
import uuid
import weakref
import zlib
from concurrent.futures import Future, TimeoutError as FutureTimeout

LOG = logging.getLogger('integration.core')

BATCH_SIZE = 100                 # what Func's own DataKit helper sends per request
MIN_INTERVAL = {'custom_object': 900, 'object': 900, 'metric': 60}
# Before the task's time limit (Func's DFF.API timeout), the collection stops
# its unfinished requests so that what it collected is delivered and recorded:
# a fifth of the time the run had, at least 5 s and at most 60 s (and never
# more than half of it).
DEADLINE_RESERVE = (0.2, 5.0, 60.0)
OBJECT_CATEGORIES = ('custom_object', 'object')
LINK_TTL = 3600       # seconds the last object tags serve the metric runs in between
LOG_FORMAT = '[%(levelname)s] %(message)s'


class ConfigError(ValueError):
    """A user mistake in a startup script or its dicts: one line, exit 2."""


class RunFailed(Exception):
    """Raised by Runner.run() after delivery when something failed; `.summary`."""

    def __init__(self, message, summary):
        super().__init__(message)
        self.summary = summary


class DataKitError(Exception):
    """DataKit answered an error, or could not be reached (status None), or
    did not answer in time (status None, timed_out: it may have taken the
    batch, which is then sent again: a point is written twice, never lost)."""

    def __init__(self, status, message, timed_out=False):
        what = f'HTTP {status}' if status else 'did not answer in time' if timed_out else 'unreachable'
        super().__init__(f'DataKit {what}: {message}')
        self.status = status
        self.body = message

    @property
    def kind(self):
        """What the answer means for the points:
        'points'    400 (DataKit's "invalid point") or 413 (body too large):
                    these points; halving the batch finds the ones to keep aside.
        'transient' unreachable, 408, 429 or 5xx: try again later.
        'config'    any other answer (401, 403, 404, 405, a 3xx, ...), and a 400
                    that is a web page rather than DataKit's JSON (a proxy's
                    "plain HTTP request sent to an HTTPS port"): the URL, the
                    token or the connector is wrong; no point is at fault."""
        if self.status is None or self.status in (408, 429) or self.status >= 500:
            return 'transient'
        if self.status in (400, 413) and not str(self.body or '').lstrip().startswith('<'):
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
        with said_in_task_log('Runner'):
            self._configure(collector_or_list, debug, datakit_id, force, clock)

    def _configure(self, collector_or_list, debug, datakit_id, force, clock):
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
        self._deadline = None
        self._failure_lines = []    # (LOG.error's arguments) said at the run's end
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
        connector = self._connector(dff)
        # Where points go: Func's connector by its id; the local runtime's also
        # by its URL, so that the skip record of one DataKit never stands for
        # another's.
        target = getattr(connector, 'target', None)
        self._target = [self.datakit_id] + ([target] if target else [])
        delivery = None if self.debug else Delivery(connector, self.datakit_id)
        LOG.info('[Runner] DataKit connector: %s (%s)%s', self.datakit_id,
                 getattr(connector, 'target', 'Func connector' if connector else 'none'),
                 ' - debug: collecting only, nothing is written' if self.debug else '')
        if delivery:
            delivery.resend_spool()
        summary = {'points_written': 0, 'points_collected': 0, 'collectors': []}
        self._deadline = Deadline.of_task()
        force = self.force if self.force is not None else force_requested(dff)
        started_at = self._started_at()
        links = ObjectLinks(self.collectors, dff, now=started_at)
        # Every collector's failure lines come after all of them, at the end
        # of the log (Func keeps its first 20,000 and last 30,000 characters
        # only: an Organization's account and region lines fill the middle).
        self._failure_lines = []
        try:
            for number, collector in enumerate(self.collectors, 1):
                summary['collectors'].append(
                    self._run_collector(number, collector, dff, delivery, force, links, started_at))
            links.end()
        finally:        # Func's timeout included
            lines, self._failure_lines = self._failure_lines, []
            for args in lines:
                LOG.error(*args)
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

    def _connector(self, dff):
        """DFF.SRC(datakit_id). Func raises when no connector has that id: one
        line saying what to do, before any AWS call; with debug=True (a script
        tried before its connector exists) nothing is written, so none is
        needed."""
        try:
            return dff.SRC(self.datakit_id)
        except Exception as e:
            why = first_line(e) or type(e).__name__
            if self.debug:
                LOG.info('[Runner] no DataKit connector %r (%s): none is needed with debug=True',
                         self.datakit_id, why)
                return None
            error = ConfigError(
                f"Runner(datakit_id={self.datakit_id!r}): Func has no DataKit connector with that "
                f"id ({why}); create one (Development > Connectors, type DataKit) with "
                "that id, or pass the id of yours")
            LOG.error('[Runner] %s', error)       # Func's task log shows only what is printed
            raise error from None

    def _started_at(self):
        """When this run counts as started for the skip rule: the tick it was
        scheduled for (Func's trigger time, or `serve`'s), so that neither
        queueing before the task nor the collectors before this one make the
        next tick look early; else the clock."""
        trigger = globals().get('_DFF_TRIGGER_TIME') or _RUNTIME.get('trigger_time')
        if self.clock is time.time and isinstance(trigger, (int, float)) and trigger > 0:
            return float(trigger)
        return self.clock()

    def _run_collector(self, number, collector, dff, delivery, force, links, started_at):
        label = f'[#{number} {collector.title}]'
        status = {'number': number, 'title': collector.title, 'points': 0,
                  'status': 'ok', 'error': None, 'regions': [], 'identity': None}
        # Everything that changes what is written: the collector's own key
        # (account, regions, options, tags, hooks) and where it is written.
        target = fingerprint(*self._target)
        state_key = f'integration_core:last_success:{collector.state_key}:{target}'
        interval = getattr(collector, 'min_interval', MIN_INTERVAL.get(collector.category, 0))
        # A collector of several accounts may key the skip rule without what
        # only selects them (freshness_key): each account's record is its own.
        fresh = Freshness(dff, f'integration_core:last_success:{_freshness_key(collector)}:{target}',
                          interval, started_at, always=self.debug or force)
        # A collector of several accounts keeps the rule per account itself.
        per_account = callable(getattr(collector, 'use_freshness', None))
        skipped = collector.use_freshness(fresh) if per_account else fresh.skip_reason()
        if skipped:
            LOG.info('%s skipped: %s (set INTEGRATION_FORCE=1 or use --force to collect anyway)',
                     label, skipped)
            status['status'] = 'skipped'
            return status
        deadline = self._deadline
        if deadline is not None and deadline.passed():
            return self._fail(status, label, f'not started: {deadline.near()}')
        links.before(collector)
        cancel = getattr(collector, 'cancel', lambda: None)
        # At the deadline the collector stops what it has not finished (see
        # Deadline); the rest of this method then delivers what it collected.
        expire = getattr(collector, 'expire', None)
        if callable(expire):
            expire(None)        # a collector run again: the last run's deadline is past
        watch = deadline.watch(expire, len(self.collectors) - number + 1) if deadline else None
        identified = False
        try:
            # start() (optional) lets the identity call overlap the first pages.
            getattr(collector, 'start', lambda: None)()
            ident = collector.identity()
            identified = True
        except Exception as e:  # the account as a whole failed: one line, not one per region
            why = watch.reason if watch and watch.fired else _one_line(e)
            return self._fail(status, label, f'account: {why}')
        finally:
            # Also on Func's timeout, which no `except Exception` sees: the
            # collector's threads must stop calling AWS when the task ends.
            if not identified:
                cancel()
                if watch is not None:
                    watch.cancel()
        status['identity'] = ident
        accounts = getattr(collector, 'accounts', lambda: [])()
        if getattr(collector, 'several_accounts', False):
            # A collector of several accounts: these credentials list and
            # open them; each account has its own line (_log_accounts), the
            # one they belong to included when it is collected.
            LOG.info('%s %d account(s), through %s via %s (%s)', label,
                     len([a for a in accounts if not a.get('unlisted')]),
                     ident.get('arn'), ident.get('method'), ident.get('partition'))
        else:
            LOG.info('%s account %s (%s) as %s via %s', label, ident.get('account_id'),
                     ident.get('partition'), ident.get('arn'), ident.get('method'))
        self._log_accounts(label, accounts)      # its failures: after the regions'
        started = time.monotonic()
        failed_before = delivery.failed_points if delivery else 0
        batch = []
        stopped = False
        points = collector.collect()
        try:
            for point in points:
                links.note(collector, point)
                batch.append(point)
                status['points'] += 1
                if len(batch) >= BATCH_SIZE:
                    self._write(delivery, collector.category, batch, state_key)
                    batch = []
            self._write(delivery, collector.category, batch, state_key)
        except Exception as e:
            LOG.debug('collector traceback:\n%s', traceback.format_exc())
            stopped = True
            self._write(delivery, collector.category, batch, state_key)
            self._fail(status, label, f'collection stopped: {_one_line(e)}')
        finally:
            # A timeout raised while we were writing leaves the generator
            # suspended: close it now so its threads stop, not at GC time.
            getattr(points, 'close', lambda: None)()
            cancel()
            if watch is not None:
                watch.cancel()
        # Every point it yielded is delivered, spooled or dead-lettered: the
        # collector may now record what it has written (never in debug).
        if delivery is not None:
            getattr(collector, 'commit', lambda: None)()
        results = list(getattr(collector, 'results', []))
        status['regions'] = results
        # The regions read first, the failures after them: Func keeps only the
        # first 20,000 and the last 30,000 characters of a task's log, and an
        # Organization's hundreds of region lines must not push a failure out.
        for region in results:
            if region.get('error'):
                continue
            if region.get('summary'):
                LOG.info('%s %s: %s, %.2f s', label, _where(region), region['summary'], region['seconds'])
            else:
                LOG.info('%s %s: %d instance(s), %d page(s), %d API call(s), %.2f s', label,
                         _where(region), region['instances'], region['pages'],
                         region['api_calls'], region['seconds'])
        # The accounts as the collection left them: one a second round opened
        # again (a kept session AWS refused) may have failed there.
        accounts = getattr(collector, 'accounts', lambda: [])()
        status['accounts'] = [dict(a) for a in accounts]
        failed_accounts = []
        for account in accounts:
            if account.get('error'):
                name = f" ({account['account_name']})" if account.get('account_name') else ''
                self._failure_lines.append(('%s account %s%s FAILED: %s', label, account['account_id'],
                                            name, account['error']))
                failed_accounts.append(account['account_id'])
        # An account of several whose every region failed (its role may not
        # read anything, say) is one line, not one per region.
        whole = _accounts_failed_everywhere(results)
        for account, regions in whole.items():
            name = f" ({regions[0]['account_name']})" if regions[0].get('account_name') else ''
            self._failure_lines.append(('%s account %s%s FAILED in every region (%d): %s', label, account,
                                        name, len(regions), regions[0]['error']))
            failed_accounts.append(account)
        for region in results:
            if region.get('error') and region.get('account') in whole:
                LOG.debug('%s %s FAILED: %s', label, _where(region), region['error'])
            elif region.get('error'):
                self._failure_lines.append(('%s %s FAILED: %s', label, _where(region), region['error']))
        failed_regions = [_where(r) for r in status['regions']
                          if r.get('error') and r.get('account') not in whole]
        failures = ([f'{len(failed_accounts)} account(s) failed: {", ".join(failed_accounts)}']
                    if failed_accounts else [])
        if failed_regions:
            failures.append(f'{len(failed_regions)} region(s) failed: {", ".join(failed_regions)}')
        if failures and status['status'] == 'ok':
            status['status'] = 'failed'
            status['error'] = '; '.join(failures)
        undelivered = (delivery.failed_points - failed_before) if delivery else 0
        LOG.info('%s %d point(s) in %.2f s%s', label, status['points'], time.monotonic() - started,
                 f', {undelivered} not delivered (spooled or dead-lettered)' if undelivered else '')
        if not undelivered and not self.debug:
            if per_account:
                for account in collector.collected_accounts():
                    fresh.mark(account)
            elif status['status'] == 'ok':
                fresh.mark()
        links.after(collector, stopped=stopped)
        return status

    @staticmethod
    def _log_accounts(label, accounts):
        """A collector of several accounts: the line of each account collected
        or skipped (the failed ones' come after the regions': _run_collector)."""
        for account in accounts:
            name = f" ({account['account_name']})" if account.get('account_name') else ''
            if account.get('skipped'):
                LOG.info('%s account %s%s skipped: %s', label, account['account_id'], name,
                         account['skipped'])
            elif not account.get('error'):
                LOG.info('%s account %s%s as %s via %s', label, account['account_id'], name,
                         account.get('arn'), account.get('method'))

    def _fail(self, status, label, message):
        self._failure_lines.append(('%s FAILED: %s', label, message))
        status['status'] = 'failed'
        status['error'] = message
        return status

    @staticmethod
    def _write(delivery, category, batch, state_key):
        # The collection's key: a spooled object snapshot gives way to the
        # same collection's newer one (Spool).
        if delivery and batch:
            delivery.write(category, batch, collector=state_key)

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
            try:
                probes = collector.check()
            except Exception as e:      # one row, as for the identity: never a traceback
                rows.append((number, 'check', 'FAIL', _one_line(e)))
                continue
            for probe in probes:
                # SKIP: left out by design (a suspended account; the management
                # account where AWS refuses the role), which a check still shows.
                verdict = 'FAIL' if not probe['ok'] else 'SKIP' if probe.get('skipped') else 'OK'
                rows.append((number, probe['region'], verdict, probe['reason']))
        _RUNTIME.setdefault('check_rows', []).extend(rows)
        width = max(len(r[1]) for r in rows)
        for number, region, verdict, reason in rows:
            print(f'#{number}  {region:<{width}}  {verdict:<4}  {reason}')
        return {'ok': not any(r[2] == 'FAIL' for r in rows), 'rows': rows}


class ObjectLinks:
    """Hands the tags of objects (e.g. EC2 instances, by their `name`) to the
    metric collectors that come after them in the same Runner, which copy
    them onto their points (a collector takes them with link_objects()).

    Object collectors skip most runs (15 minutes) while metric collectors run
    every few minutes, so the last map is kept in DFF.CACHE for LINK_TTL and
    used by the runs in between. The key is the object collectors' own
    (freshness) keys: the map of this startup script's estate, shared by the
    scripts that split one Organization's accounts between them. Each object
    is kept with the collector that saw it and when: a collector's run renews
    its objects of the regions it read in full (one it no longer lists there
    is gone), keeps the others (its failed regions, its accounts skipped or
    failed, other collectors' and scripts' objects), and an object nobody
    saw for LINK_TTL goes (an account suspended or gone)."""

    def __init__(self, collectors, dff, now=None):
        self.dff = dff
        self.now = time.time() if now is None else now
        self.linkers = [c for c in collectors if callable(getattr(c, 'link_objects', None))]
        self.sources = [c for c in collectors if c.category in OBJECT_CATEGORIES]
        self.objects = {}
        self.seen = {}          # name -> [the source's key, when it saw it]
        self.noted = set()      # the names seen this run
        self.fresh = False
        # Keyed as the skip rule is (freshness_key: not the accounts an
        # Organization selects, whose edit must not lose the map).
        self.key = 'integration_core:objects:' + fingerprint(sorted(
            _freshness_key(c) for c in self.sources))
        if self.linkers and self.sources:
            first_linker = min(collectors.index(c) for c in self.linkers)
            last_source = max(collectors.index(c) for c in self.sources)
            if first_linker < last_source:
                LOG.warning('[Runner] collector #%d (%s) comes before #%d (%s): metrics can take '
                            "object tags only from collectors before them; put metric "
                            'collectors last', first_linker + 1, collectors[first_linker].title,
                            last_source + 1, collectors[last_source].title)

    def before(self, collector):
        if collector not in self.linkers:
            return
        if not self.fresh and self.sources:
            self.objects, self.seen = self._last()
        collector.link_objects(dict(self.objects))

    def _last(self):
        """The map as last kept (this run's other collectors' included): objects
        seen within LINK_TTL. A time ahead of this run's (a clock that was
        ahead) counts as now; an object without one (the map of the version
        before) as seen half that long ago, by no collector."""
        objects, seen = _unpack_objects(unpack_json(cache_get(self.dff.CACHE, self.key)))
        for name in list(objects):
            by, at = seen.get(name) or (None, self.now - LINK_TTL / 2)
            at = min(at, self.now)
            if self.now - at > LINK_TTL:
                del objects[name]
                seen.pop(name, None)
            else:
                seen[name] = [by, at]
        return objects, seen

    def note(self, collector, point):
        if self.linkers and collector in self.sources:
            tags = point.get('tags') or {}
            name = tags.get('name')
            if name:
                self.objects[name] = {k: v for k, v in tags.items() if k != 'name'}
                self.seen[name] = [_freshness_key(collector), self.now]
                self.noted.add(name)

    def after(self, collector, stopped=False):
        """An object collector ran: the map keeps its objects of this run, and
        of the last map those it did not read again in full this run (none,
        when its collection `stopped` part-way)."""
        if not self.linkers or collector not in self.sources:
            return
        source = _freshness_key(collector)
        results = getattr(collector, 'results', None)
        read = None         # (account, region) read in full; None: all of the collector's
        several = False
        if stopped:
            read = set()
        elif results is not None:
            several = getattr(collector, 'several_accounts', False) or any(
                r.get('account') for r in results)
            read = {(r.get('account'), r.get('region')) for r in results if not r.get('error')}
        objects, seen = self._last()
        for name, tags in objects.items():
            if name in self.noted:
                continue        # this run's
            by, at = seen[name]
            # One account's AccountId may be an extra tag: not the account's.
            where = (tags.get('AccountId') if several else None, tags.get('RegionId'))
            if by == source and (read is None or where in read):
                # Read again in full without it: gone (also from what an
                # earlier collector's after() or before() brought in).
                self.objects.pop(name, None)
                self.seen.pop(name, None)
                continue
            self.objects[name], self.seen[name] = tags, [by, at]
        self.fresh = True
        self._keep(self.objects, self.seen)

    def end(self):
        """The run's end. Another script of the same key (an Organization's
        accounts split between scripts) may have written the map between
        this run's reading and writing it in after(), from what it read
        before: this run's objects would be missing until its next object
        collection. Seconds later, the map is read again and they are put
        back beside the other script's."""
        if not self.fresh or not self.noted:
            return
        objects, seen = self._last()
        if all(seen.get(name, (None, -math.inf))[1] >= self.now for name in self.noted):
            return
        for name in self.noted:
            objects[name], seen[name] = self.objects[name], self.seen[name]
        self._keep(objects, seen)

    def _keep(self, objects, seen):
        try:
            self.dff.CACHE.set(self.key, pack_json(_pack_objects(objects, seen)), expires=LINK_TTL)
        except Exception as e:
            LOG.warning('[Runner] cannot keep the object tags for the next metric runs: %s',
                        _one_line(e))


def _freshness_key(collector):
    """The key of a collector's skip rule and object map: its freshness_key,
    else its state_key."""
    return getattr(collector, 'freshness_key', None) or collector.state_key


def _pack_objects(objects, seen=None):
    """{name: tags} as {'keys': [tag keys], 'rows': {name: [values]}, 'seen':
    {name: [source key's fingerprint, time]}}."""
    keys = sorted({k for tags in objects.values() for k in tags})
    packed = {'keys': keys, 'rows': {name: [tags.get(k) for k in keys] for name, tags in objects.items()}}
    if seen is not None:
        packed['seen'] = {name: seen[name] for name in objects if name in seen}
    return packed


def _unpack_objects(packed):
    """(objects, seen) of _pack_objects; ({}, {}) for anything else."""
    try:
        keys = packed['keys']
        objects = {name: {k: v for k, v in zip(keys, values) if v is not None}
                   for name, values in packed['rows'].items()}
        seen = {name: [str(by), float(at)] for name, (by, at) in (packed.get('seen') or {}).items()
                if name in objects}
        # A damaged time (NaN, infinite) counts as none.
        return objects, {name: v for name, v in seen.items() if math.isfinite(v[1])}
    except (TypeError, KeyError, AttributeError, ValueError):
        return {}, {}


def cache_get(cache, key):
    """cache.get(key), or None when the cache cannot be read (Redis away, a
    damaged file): a broken cache costs a refetch, never the run."""
    try:
        return cache.get(key)
    except Exception as e:
        LOG.warning('[Runner] cannot read the cache: %s', _one_line(e))
        return None




def _failures(summary, delivery):
    failures = [f"#{c['number']} {c['title']}: {c['error']}"
                for c in summary['collectors'] if c['status'] == 'failed']
    if delivery and delivery.failed_points:
        failures.append(f'{delivery.failed_points} point(s) not delivered: {delivery.last_error}')
    return failures


PACKED = 'zlib:'


def pack_json(value):
    """JSON text for DFF.CACHE (which takes strings); above 4 KiB compressed
    (zlib, base64), as ListMetrics answers and object maps run to megabytes."""
    text = json.dumps(value, separators=(',', ':'))
    if len(text) <= 4096:
        return text
    return PACKED + base64.b64encode(zlib.compress(text.encode('utf-8'), 6)).decode('ascii')


def unpack_json(text):
    """What pack_json packed; None for nothing or for anything unreadable
    (a foreign or damaged entry counts as absent)."""
    if not text:
        return None
    try:
        if isinstance(text, bytes):
            text = text.decode('utf-8')
        if text.startswith(PACKED):
            text = zlib.decompress(base64.b64decode(text[len(PACKED):])).decode('utf-8')
        return json.loads(text)
    except (ValueError, TypeError, zlib.error, UnicodeDecodeError):
        LOG.warning('[Runner] ignoring an unreadable cache entry')
        return None


def schedule_grace(interval):
    """How much earlier than `interval` a start may come and still collect.

    The record is when the last successful collection *started*, so a run's
    own length never delays the next one; the grace absorbs Func starting a
    tick late (queueing, a busy worker) and an earlier tick early. On a */15
    schedule every tick collects; a second trigger or a manual run within
    13 minutes of the last start is skipped. A quarter of the interval, at
    most 2 minutes: 15 s for metrics collected every minute."""
    return min(interval / 4.0, 120.0)


class Freshness:
    """The skip rule (see schedule_grace) for one collection, or for each
    account of a collection of several (`part`): when its last successful
    collection started, kept in DFF.CACHE."""

    def __init__(self, dff, key, interval, now, always=False):
        self.dff = dff
        self.key = key
        self.interval = interval
        self.now = now
        self.always = always        # debug or force: never skip

    def skip_reason(self, part=''):
        """Why to skip now, or None to collect."""
        if self.always:
            return None
        try:
            raw = self.dff.CACHE.get(self._key(part))
            age = self.now - float(json.loads(raw)['started']) if raw else None
        except Exception as e:  # a broken or foreign record must not stop collection
            LOG.warning('[Runner] ignoring an unreadable last-collection record: %s', _one_line(e))
            return None
        if age is not None and age < self.interval - schedule_grace(self.interval):
            return f'the last collection started {age:.0f} s ago, under {self.interval:.0f} s'
        return None

    def mark(self, part=''):
        try:
            self.dff.CACHE.set(self._key(part), json.dumps({'started': self.now}),
                               expires=max(1, int(self.interval)))
        except Exception as e:
            LOG.warning('[Runner] cannot record the collection time: %s', _one_line(e))

    def _key(self, part):
        return f'{self.key}:{part}' if part else self.key


class Deadline:
    """When a run stops collecting: DEADLINE_RESERVE before the task's time
    limit, so that what was collected is delivered and recorded, and what was
    not finished fails with one line each, instead of the task's timeout
    ending the run with nothing delivered (an account whose endpoint hangs
    would cost every other account's points). The collectors of a run share
    the time: each may take the time left divided by the collectors still to
    run, so that one that hangs leaves the next (CloudWatch after EC2) its
    part."""

    ADVICE = 'raise DFF.API(timeout=...), or split the accounts over several startup scripts'

    def __init__(self, left):
        share, low, high = DEADLINE_RESERVE
        self.reserve = min(high, max(low, left * share), left / 2)
        self.limit = time.monotonic() + left
        self.at = self.limit - self.reserve

    @classmethod
    def of_task(cls):
        """The task's deadline, or None without a time limit: Func arms the
        process's real-time timer (SIGALRM) for its DFF.API timeout, and
        `integration-runner run` does the same."""
        try:
            left = signal.getitimer(signal.ITIMER_REAL)[0]
        except (AttributeError, OSError, ValueError):  # no such timer here (Windows)
            return None
        return cls(left) if left > 0 else None

    def passed(self):
        return time.monotonic() >= self.at

    def near(self):
        return f"the task's time limit is under {self.reserve:.3g} s away: {self.ADVICE}"

    def reason(self):
        """The line of what a collector had not finished when stopped (now)."""
        return (f"unfinished {self.limit - time.monotonic():.3g} s before the task's time limit, "
                f'stopped so that what was collected is delivered: {self.ADVICE}')

    def watch(self, expire, collectors_left):
        """expire(reason) when this collector's share of the time is over, on
        a timer's thread (a collector's expire stops its requests); None for
        a collector without one."""
        if not callable(expire):
            return None
        now = time.monotonic()
        return _DeadlineWatch(self, expire, now + max(0.0, self.at - now) / max(1, collectors_left))


class _DeadlineWatch:
    def __init__(self, deadline, expire, at):
        self.fired = False
        self.reason = None
        self._deadline, self._expire = deadline, expire
        self._timer = threading.Timer(max(0.0, at - time.monotonic()), self._fire)
        self._timer.daemon = True
        self._timer.name = 'integration-deadline'
        self._timer.start()

    def _fire(self):
        self.reason = self._deadline.reason()
        self.fired = True
        self._expire(self.reason)

    def cancel(self):
        self._timer.cancel()


def _accounts_failed_everywhere(results):
    """{account: its results} of the accounts (of a collector of several)
    with more than one region, every one of them failed."""
    by_account = {}
    for result in results:
        if result.get('account'):
            by_account.setdefault(result['account'], []).append(result)
    return {account: mine for account, mine in by_account.items()
            if len(mine) > 1 and all(r.get('error') for r in mine)}


def _where(region):
    """'us-east-1', or '111122223333 us-east-1' for a collector of several accounts."""
    return f"{region['account']} {region['region']}" if region.get('account') else region['region']


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

SNAPSHOT_CATEGORIES = ('custom_object', 'object')   # each collection supersedes the last
# Limits of what is kept on disk, per DataKit connector: (environment variable
# for the total size in MiB, its default, variable for the age in days, default).
SPOOL_LIMITS = {
    'spool': ('INTEGRATION_SPOOL_MAX_MB', 256, 'INTEGRATION_SPOOL_MAX_DAYS', 7),
    'deadletter': ('INTEGRATION_DEADLETTER_MAX_MB', 64, 'INTEGRATION_DEADLETTER_MAX_DAYS', 30),
}
SPOOL_FORMAT = 2


class Delivery:
    """Writes batches of points to DataKit through a DFF connector.

    Every point becomes line protocol once (one without a timestamp gets the
    time it was encoded, as Func's connector would give it when sending);
    those bytes are what is sent, spooled and sent again, so a replay is
    byte-identical to the first attempt. They go through the connector's raw
    write: write_line_protocol(category, lines) of the local DataKitClient, or
    _do_post of Func's DataKit (or DataWay) helper, where its own
    write_by_category_many ends. A connector with neither gets the point
    dicts through write_by_category_many, and the spool waits for a run
    through one that has.

    What DataKit's answer means (DataKitError.kind):
      'points'    (400, 413) the batch is halved down to the points DataKit
                  refuses; they go to one dead-letter file, the rest is delivered.
      'transient' (unreachable, 408, 429, 5xx, after the client's retries) what
                  was not accepted yet, and the rest of the run, is spooled.
      'config'    (401, 403, 404, ...) one line says what to check; everything
                  is spooled and nothing more is sent this run.
    Points accepted before a failure are never sent again."""

    def __init__(self, connector, datakit_id, spool=None, clock=time.time):
        self.connector = connector
        self.datakit_id = datakit_id
        self.spool = spool or Spool(datakit_id)
        self.clock = clock
        self.run_id = uuid.uuid4().hex[:12]
        self._raw = _raw_writer(connector)
        self.written = 0
        self.spooled = 0
        self.dead_lettered = 0
        self.failed_points = 0   # not delivered by this run: spooled, dead-lettered, left in the spool
        self.last_error = None
        self.down = False        # after DataKit failed once, the rest of the run is spooled

    def resend_spool(self):
        """Send what earlier runs spooled, oldest first, before anything new."""
        with self.spool.locked():
            self.spool.prune(self.clock())
            names = self.spool.names()
            if not names:
                return
            if self._raw is None:
                LOG.warning('[Runner] %d spooled batch(es) wait for a later run: the connector %r '
                            'cannot send line protocol', len(names), self.datakit_id)
                return
            LOG.info('[Runner] resending %d spooled batch(es) first', len(names))
            for index, name in enumerate(names):
                entry = self.spool.read(name)
                if entry is None:
                    continue
                lines = self._lines_of(entry)
                try:
                    self._deliver(entry['category'], lines)
                except _Undelivered as stop:
                    self._stop(stop.error, entry['category'])
                    self.spool.keep(name, entry, [lines[i] for i in stop.remaining])
                    left = len(stop.remaining) + sum(_spool_count(n) or 0 for n in names[index + 1:])
                    self.failed_points += left
                    LOG.warning('[Runner] %d spooled point(s) kept for a later run', left)
                    return
                self.spool.remove(name)

    def write(self, category, points, collector=None):
        """Deliver one batch of point dicts. `collector` is a stable key of the
        collector that made them: with it, a spooled object snapshot is
        superseded by the same collector's newer one (see Spool)."""
        lines, encoded = self._encode(category, points)
        if not lines:
            return
        if self.down:
            return self._spool(category, lines, collector)
        try:
            self._deliver(category, lines, encoded)
        except _Undelivered as stop:
            self._stop(stop.error, category)
            self._spool(category, [lines[i] for i in stop.remaining], collector)

    def _encode(self, category, points):
        """Line protocol for each point; one that cannot be line protocol is a
        dead letter at once and is never sent."""
        lines, encoded, invalid = [], [], []
        stamp = None
        for point in points:
            if isinstance(point, dict) and point.get('timestamp') is None:
                stamp = stamp or time.time_ns()
                point = dict(point, timestamp=stamp)
            try:
                lines.append(to_line_protocol(point))
                encoded.append(point)
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                invalid.append({'name': _point_name(point), 'error': str(e),
                                'point': point if isinstance(point, dict) else repr(point)})
        if invalid:
            error = InvalidPoint(f"name={invalid[0]['name']}: {invalid[0]['error']}")
            self._dead_letter(category, invalid, error, 'cannot be line protocol')
        return lines, encoded

    def _lines_of(self, entry):
        if 'lines' in entry:
            return entry['lines']
        # A batch spooled by an earlier version, as point dicts.
        return self._encode(entry['category'], entry['points'])[0]

    def _deliver(self, category, lines, points=None):
        """Send `lines`, BATCH_SIZE a request. A batch DataKit refuses as points
        is halved down to the lines it refuses, which become one dead-letter
        file. Any other failure raises _Undelivered with the indexes not
        accepted yet, in order."""
        pending = [(start, min(start + BATCH_SIZE, len(lines)))
                   for start in range(0, len(lines), BATCH_SIZE)]
        refused, refusal = [], None
        while pending:
            start, end = pending.pop(0)
            try:
                self._post(category, lines[start:end], points[start:end] if points else None)
            except Exception as e:
                error = e if isinstance(e, DataKitError) else _as_datakit_error(e)
                if error.kind != 'points':
                    if refused:
                        self._refused(category, lines, refused, refusal)
                    left = [(start, end)] + pending
                    raise _Undelivered(error, [i for first, last in left for i in range(first, last)])
                if end - start == 1:
                    refused.append(start)
                    refusal = error
                else:
                    middle = (start + end) // 2
                    pending[:0] = [(start, middle), (middle, end)]
                continue
            self.written += end - start
        if refused:
            self._refused(category, lines, refused, refusal)

    def _post(self, category, lines, points=None):
        if self._raw is not None:
            result = self._raw(category, lines)
        else:
            result = self.connector.write_by_category_many(category, points)
        # Func's helper raises only from 400 on: a 3xx (a redirecting proxy)
        # would otherwise count as delivered.
        status = result[0] if isinstance(result, tuple) and result else None
        if isinstance(status, int) and not 200 <= status < 300:
            raise DataKitError(status, ' '.join(str(result[1:]).split())[:1000])
        return result

    def _refused(self, category, lines, indexes, error):
        records = [{'name': _line_name(lines[i]), 'line': lines[i]} for i in indexes]
        self._dead_letter(category, records, error, 'DataKit rejected')

    def _dead_letter(self, category, records, error, verb):
        self.dead_lettered += len(records)
        self.failed_points += len(records)
        self.last_error = str(error)
        path = self.spool.dead_letter(category, records, error, self.clock())
        names = [str(r['name']) for r in records]
        if verb == 'DataKit rejected':
            LOG.error('[Runner] DataKit rejected %d point(s) (name=%s%s): %s; kept in %s', len(records),
                      ', '.join(names[:5]), ', ...' if len(names) > 5 else '', error, path)
        else:
            LOG.error('[Runner] %d point(s) cannot be line protocol (name=%s%s): %s; kept in %s',
                      len(records), ', '.join(names[:5]), ', ...' if len(names) > 5 else '', error, path)

    def _stop(self, error, category):
        """DataKit failed, not over the points: nothing more is sent this run."""
        self.down = True
        message = self._explain(error, category) if error.kind == 'config' else str(error)
        if message != self.last_error:
            LOG.error('[Runner] %s', message)
        self.last_error = message

    def _explain(self, error, category):
        """One line for a configuration error: what is wrong, what to check."""
        where = (f"the DataKit connector {self.datakit_id!r} in Func" if in_func()
                 else '--datakit or DATAKIT_URL')
        if error.status in (401, 403, 407):
            check = f'check the token and access rights that {where} uses'
        else:
            check = (f"check {where}: it must be DataKit's HTTP address, "
                     'e.g. http://127.0.0.1:9529')
        answer = ' '.join(str(error.body).split())[:300]
        return (f'DataKit at {_connector_target(self.connector, self.datakit_id)} answered HTTP '
                f'{error.status} to POST /v1/write/{category} ({answer}): not a problem of '
                f'the points but of the configuration; {check}. The points are spooled and '
                'nothing more is sent this run')

    def _spool(self, category, lines, collector):
        path = self.spool.add(category, lines, collector, self.run_id, self.clock())
        self.spooled += len(lines)
        self.failed_points += len(lines)
        LOG.warning('[Runner] %d point(s) spooled to %s', len(lines), path)


class _Undelivered(Exception):
    """DataKit failed (not over the points); `remaining`: indexes not accepted."""

    def __init__(self, error, remaining):
        super().__init__(str(error))
        self.error = error
        self.remaining = remaining


_FUNC_STATUS = re.compile(r'Status Code: (\d{3})\b')


def _as_datakit_error(error):
    """A connector's exception as a DataKitError. Func's DataKit helper raises
    a plain Exception('POST ... failed. Status Code: 404, Response: ...') on
    HTTP >= 400, and Exception('... failed. Error: ...') or a socket error
    when DataKit cannot be reached."""
    status = getattr(error, 'status', None) or getattr(error, 'status_code', None)
    text = str(error)
    if not isinstance(status, int):
        match = _FUNC_STATUS.search(text)
        status = int(match.group(1)) if match else None
    if status is not None and ', Response: ' in text:
        text = text.split(', Response: ', 1)[1]
        return DataKitError(status, ' '.join(text.split())[:1000])
    return DataKitError(status, _one_line(error))


def _raw_writer(connector):
    """write(category, lines) -> (status, body) through the connector, raising
    on HTTP >= 400; None when the connector cannot send line protocol."""
    write = getattr(connector, 'write_line_protocol', None)
    if callable(write):                        # integration_local's DataKitClient
        return write
    post = getattr(connector, '_do_post', None)
    if not callable(post):
        return None
    # Func's DataKit helper (and DataWay's): what write_by_category_many does
    # after encoding, with our bytes. DataWay's _do_post adds its token.
    source = getattr(connector, 'source', None)

    def write_func(category, lines):
        return post(path=f'/v1/write/{category}', body='\n'.join(lines), content_type='text/plain',
                    query={'input': source} if isinstance(source, str) else None,
                    headers={'X-DFF-Line-Protocol-Category': category})
    return write_func


def _connector_target(connector, datakit_id):
    target = getattr(connector, 'target', None)
    if isinstance(target, str):
        return target
    host, port = getattr(connector, 'host', None), getattr(connector, 'port', None)
    if isinstance(host, str):
        return f"{getattr(connector, 'protocol', None) or 'http'}://{host}:{port}"
    return f'connector {datakit_id!r}'


_LINE_NAME = re.compile(r',name=((?:\\.|[^,\s\\])+)')


def _line_name(line):
    """The `name` tag of a line (for logs): in the series key, before the first unescaped space."""
    series = re.split(r'(?<!\\) ', line, maxsplit=1)[0]
    match = _LINE_NAME.search(series)
    return re.sub(r'\\(.)', r'\1', match.group(1)) if match else None


def _point_name(point):
    try:
        return str((point.get('tags') or {}).get('name'))
    except AttributeError:
        return None


class Spool:
    """What DataKit could not take, on disk, per DataKit connector.

    spool/<connector>/<ns>-<slot>-<run>-<count>-<random>.json, one per batch,
    written atomically with mode 0600: {"format": 2, "category", "collector",
    "lines": [line protocol, one per point]}. `slot` is a hash of the category
    and the collector's key for object snapshots (custom_object, object), '0'
    for everything else; a run's snapshot supersedes older runs' batches of
    its slot, so at most one snapshot per collector waits. Metrics keep every
    point. deadletter/<connector>/<ns>-<count>-<random>.json: the points DataKit
    refused (name and line) or that cannot be line protocol (name, error,
    point), with DataKit's status and error.

    Both are capped by total size and age (SPOOL_LIMITS: 256 MiB and 7 days
    for the spool, 64 MiB and 30 days for dead letters, or the environment
    variables, or Func environment variables, named there): expired files
    go first, then the oldest until the total fits. Each drop is one log line
    saying what was dropped and why."""

    def __init__(self, datakit_id, root=None):
        base = root or state_dir()
        self.dir = os.path.join(base, 'spool', _safe_name(datakit_id))
        self.dead_dir = os.path.join(base, 'deadletter', _safe_name(datakit_id))
        self.limits = {what: _spool_limits(what) for what in SPOOL_LIMITS}

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

    def names(self, directory=None):
        """The batch files, oldest first."""
        directory = directory or self.dir
        try:
            listing = sorted(os.listdir(directory))
        except FileNotFoundError:
            return []
        out = []
        for name in listing:
            if name.startswith('.tmp-'):
                _remove_stale(os.path.join(directory, name))
            elif name.endswith('.json'):
                out.append(name)
        return out

    def read(self, name):
        path = os.path.join(self.dir, name)
        try:
            with open(path, encoding='utf-8') as f:
                entry = json.load(f)
            if not (isinstance(entry, dict) and isinstance(entry.get('category'), str) and (
                    isinstance(entry.get('lines'), list) or isinstance(entry.get('points'), list))):
                raise ValueError('not a spooled batch')
            return entry
        except FileNotFoundError:        # another run sent or dropped it meanwhile
            return None
        except (OSError, ValueError) as e:
            LOG.error('[Runner] unreadable spool file %s left in place: %s', path, e)
            return None

    def add(self, category, lines, collector=None, run='0', now=None):
        now = time.time() if now is None else now
        slot = _spool_slot(category, collector)
        name = f'{int(now * 1e9)}-{slot}-{run}-{len(lines)}-{uuid.uuid4().hex[:6]}.json'
        path = atomic_write(os.path.join(self.dir, name), json.dumps(
            {'format': SPOOL_FORMAT, 'category': category, 'collector': collector, 'lines': lines}))
        if slot != '0':
            older = [n for n in self.names() if _spool_fields(n)[1] == slot
                     and _spool_fields(n)[2] != run]
            self._drop(self.dir, older, f"superseded by this run's {category} snapshot of the "
                                        'same collector')
        self._cap(self.dir, 'spool', now, keep=name)
        return path

    def keep(self, name, entry, lines):
        """Rewrite a batch with only `lines`, the ones not delivered yet."""
        path = os.path.join(self.dir, name)
        atomic_write(path, json.dumps({'format': SPOOL_FORMAT, 'category': entry['category'],
                                       'collector': entry.get('collector'), 'lines': lines}))
        ns, slot, run, _ = _spool_fields(name)
        if slot is not None:
            renamed = f'{ns}-{slot}-{run}-{len(lines)}-{name.rsplit("-", 1)[1]}'
            with contextlib.suppress(OSError):
                os.rename(path, os.path.join(self.dir, renamed))
                sync_folder(self.dir)

    def remove(self, name):
        """A batch DataKit took: gone for good, also after a power loss (it
        would be sent again)."""
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(self.dir, name))
            sync_folder(self.dir)

    def dead_letter(self, category, records, error, now=None):
        now = time.time() if now is None else now
        name = f'{int(now * 1e9)}-{len(records)}-{uuid.uuid4().hex[:6]}.json'
        body = {'format': SPOOL_FORMAT, 'category': category, 'status': error.status,
                'error': error.body, 'points': records}
        path = atomic_write(os.path.join(self.dead_dir, name), json.dumps(body, default=str))
        self._cap(self.dead_dir, 'deadletter', now, keep=name)
        return path

    def prune(self, now):
        """Before a resend: drop expired batches and all but the newest
        snapshot of each slot, then keep both folders within their size."""
        self._cap(self.dead_dir, 'deadletter', now)
        newest = {}
        for name in self.names():
            ns, slot, run, _ = _spool_fields(name)
            if slot not in (None, '0'):
                newest[slot] = run        # names sort oldest first: the last run wins
        older = [n for n in self.names() if _spool_fields(n)[1] in newest
                 and _spool_fields(n)[2] != newest[_spool_fields(n)[1]]]
        self._drop(self.dir, older, 'superseded by a newer snapshot of the same collector')
        self._cap(self.dir, 'spool', now)

    def _cap(self, directory, what, now, keep=None):
        max_bytes, max_age = self.limits[what]
        env_mb, _, env_days, _ = SPOOL_LIMITS[what]
        names = self.names(directory)
        expired = [n for n in names if now - _spool_time(directory, n) > max_age]
        self._drop(directory, expired, f'older than {max_age / 86400:g} day(s) ({env_days})')
        sizes = []
        for name in names:
            if name in expired:
                continue
            with contextlib.suppress(OSError):
                sizes.append((name, os.path.getsize(os.path.join(directory, name))))
        total = sum(size for _, size in sizes)
        over = []
        for name, size in sizes:          # oldest first; the file just written last
            if total <= max_bytes:
                break
            if name != keep:
                over.append(name)
                total -= size
        self._drop(directory, over, f'over the {max_bytes / 2 ** 20:g} MiB limit ({env_mb}), '
                                    'oldest first')

    def _drop(self, directory, names, why):
        if not names:
            return
        size = points = 0
        for name in names:
            path = os.path.join(directory, name)
            count = _spool_count(name, dead=directory == self.dead_dir)
            with contextlib.suppress(OSError, ValueError, TypeError, AttributeError):
                if count is None:         # a name without the count: an earlier version's
                    with open(path, encoding='utf-8') as f:
                        entry = json.load(f)
                    count = len(entry.get('lines') or entry.get('points') or [])
            with contextlib.suppress(OSError):
                size += os.path.getsize(path)
                os.remove(path)
                points += count or 0
        what = 'dead-letter file(s)' if directory == self.dead_dir else 'spooled batch(es)'
        LOG.warning('[Runner] dropped %d %s (%d point(s), %.1f MiB) from %s: %s', len(names),
                    what, points, size / 2 ** 20, directory, why)


def _spool_slot(category, collector):
    if category not in SNAPSHOT_CATEGORIES or not collector:
        return '0'
    return hashlib.sha256(f'{category}\0{collector}'.encode()).hexdigest()[:12]


def _spool_fields(name):
    """(ns, slot, run, count) of a batch file's name; slot, run and count are
    None for a batch an earlier version spooled (<ns>-<random>.json)."""
    parts = name[:-len('.json')].split('-')
    if len(parts) == 5 and parts[3].isdigit():
        return parts[0], parts[1], parts[2], int(parts[3])
    return parts[0], None, None, None


def _spool_count(name, dead=False):
    """The number of points a file's name says it holds; None when it doesn't."""
    parts = name[:-len('.json')].split('-')
    if dead:
        return int(parts[1]) if len(parts) == 3 and parts[1].isdigit() else None
    return _spool_fields(name)[3]


def _spool_time(directory, name):
    prefix = name.split('-', 1)[0]
    if prefix.isdigit() and len(prefix) >= 18:
        return int(prefix) / 1e9
    try:
        return os.path.getmtime(os.path.join(directory, name))
    except OSError:
        return time.time()


def _spool_limits(what):
    """(bytes, seconds) for 'spool' or 'deadletter', from the environment (or a
    Func environment variable of that name), else SPOOL_LIMITS' defaults."""
    env_mb, default_mb, env_days, default_days = SPOOL_LIMITS[what]
    out = []
    for name, default, unit, scale in ((env_mb, default_mb, 'MiB', 2 ** 20),
                                       (env_days, default_days, 'days', 86400)):
        value = _setting(name)
        if value is None or value == '':
            out.append(default * scale)
            continue
        try:
            number = float(value)
            if isinstance(value, bool) or not number > 0 or not math.isfinite(number):
                raise ValueError(value)
        except (TypeError, ValueError):
            raise ConfigError(f'{name}={value!r}: must be a number of {unit} above 0, '
                              f'e.g. {default} (the default)') from None
        out.append(number * scale)
    return tuple(out)


def _setting(name):
    """The process environment's value of `name`, else, inside Func, the Func
    environment variable's."""
    value = os.environ.get(name)
    if value is None and in_func():
        try:
            value = current_dff().ENV(name)
        except Exception as e:
            LOG.warning('[Runner] cannot read the Func environment variable %s: %s', name,
                        _one_line(e))
    return value


# --------------------------------------------------------------------------
# DataKit HTTP client (the local DFF.SRC) and line protocol
# --------------------------------------------------------------------------

_LINE_BREAK = re.compile(r'\r\n|[\r\n]')
TAG_VALUE_MAX_BYTES = 1024      # DataKit cuts longer tag values


def clean_tags(tags):
    """Tags as collectors should write them: values through tag_value, and
    the empty ones left out."""
    out = {}
    for key, value in tags.items():
        value = tag_value(value)
        if value:
            out[key] = value
    return out


def tag_value(value):
    """The user's text as a tag value, changed only where line protocol cannot
    carry it: a line break becomes a space (it would end the line) and the
    value is cut at 1024 bytes (DataKit's limit). Tabs, runs of spaces and
    leading or trailing blanks are kept; None or '' means "omit the tag"."""
    if value is None:
        return None
    if (type(value) is str and value.isascii() and len(value) <= TAG_VALUE_MAX_BYTES
            and '\n' not in value and '\r' not in value):
        return value        # most values: short ASCII text on one line
    text = _LINE_BREAK.sub(' ', str(value))
    encoded = text.encode('utf-8')
    if len(encoded) > TAG_VALUE_MAX_BYTES:
        text = encoded[:TAG_VALUE_MAX_BYTES].decode('utf-8', 'ignore')
    return text


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
    tags = [(str(key), str(value)) for key, value in sorted((point.get('tags') or {}).items())]
    if not _LP_PLAIN.fullmatch(''.join([key + value for key, value in tags])):
        # Some name or value to escape (rare): each on its own.
        tags = [(_lp_name(key, ',= '), _lp_name(value, ',= ')) for key, value in tags]
    tags = [f'{key}={value}' for key, value in tags if key and value]
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
    if not line.isascii():
        # A text with no UTF-8 (a lone surrogate): this point's error
        # (UnicodeEncodeError), not its batch's when it is sent.
        line.encode('utf-8')
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
    if type(value) is str:          # most fields: the JSON of a described resource
        return _lp_string(value)
    if isinstance(value, bool):
        return 'true' if value else 'false'
    if isinstance(value, int):
        return f'{value}i'
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f'field {key!r} is {value}: line protocol has no NaN or infinity')
        return repr(value)
    if isinstance(value, (datetime.datetime, datetime.date)):
        value = value.isoformat()       # a time as text, not as a JSON string in quotes
    elif isinstance(value, decimal.Decimal) and value.is_finite():
        return repr(float(value))
    elif not isinstance(value, str):
        value = json.dumps(value, ensure_ascii=False, default=str)
    return _lp_string(value)


def _lp_string(value):
    if '\\' in value:
        value = value.replace('\\', '\\\\')
    return '"' + value.replace('"', '\\"') + '"'


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


@contextlib.contextmanager
def said_in_task_log(label):
    """A user's mistake found where a startup script makes its collectors and
    Runner, before any run: inside Func its line is printed as well, as every
    other mistake's, since the task log shows only what is printed (the
    exception goes on to end the task). Outside Func the exception is the
    one report (integration-runner prints it)."""
    try:
        yield
    except ConfigError as e:
        if in_func():
            with task_log():
                LOG.error('[%s] %s', label, e)
        raise


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
    """As Func reads a typed environment variable: text 1/true/yes/on, a
    positive number, True, or a list whose first item is one of these."""
    if isinstance(value, str):
        return value.strip().lower() in ('1', 'true', 'yes', 'on')
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)):
        return value > 0
    if isinstance(value, (list, tuple)):
        return bool(value) and _truthy(value[0])
    return False


def state_dir():
    """Where the spool, the dead letters and the local cache live:
    $INTEGRATION_STATE_DIR (created with mode 0700 when missing), else
    ~/.cache/dataflux-integration, else, when the home cannot be written (as in
    some containers), dataflux-integration-<uid> in the temporary folder.

    What is found there is trusted (a spooled batch is sent to DataKit), so
    the folder must be this user's and closed to others: owned by our uid and
    writable by nobody else; the one in the shared temporary folder must
    moreover be a real directory (not a symbolic link) with no permission for
    group or others. Otherwise ConfigError, one line saying why and what to do."""
    configured = os.environ.get('INTEGRATION_STATE_DIR')
    if configured:
        try:
            _makedirs(configured)
        except OSError as e:
            raise ConfigError(f'INTEGRATION_STATE_DIR={configured!r} cannot be created '
                              f'({e.strerror or e}): set it to a folder this user may write') from None
        return _private_dir(configured, 'INTEGRATION_STATE_DIR', shared=False)
    home = os.path.join(os.path.expanduser('~'), '.cache', 'dataflux-integration')
    try:
        _makedirs(home)
    except OSError:
        fallback = os.path.join(tempfile.gettempdir(), f'dataflux-integration-{os.getuid()}')
        try:
            os.mkdir(fallback, 0o700)
        except FileExistsError:
            pass                          # checked below: someone else may have made it
        except OSError as e:
            raise ConfigError(f'cannot create the state directory {fallback} ({e.strerror or e}) '
                              'and the home folder is not writable: set INTEGRATION_STATE_DIR '
                              'to a folder of your own') from None
        return _private_dir(fallback, 'used because the home folder is not writable', shared=True)
    return _private_dir(home, 'the default', shared=False)


def _private_dir(path, origin, shared):
    """`path` when only this user can change what is in it, else ConfigError.
    shared=True (in the temporary folder, where anyone may take the name
    first): no symbolic link either, and no permission at all for others."""
    uid = os.getuid()
    info = os.lstat(path) if shared else os.stat(path)
    problem = None
    if stat.S_ISLNK(info.st_mode):
        problem = 'is a symbolic link'
    elif not stat.S_ISDIR(info.st_mode):
        problem = 'is not a directory'
    elif info.st_uid != uid:
        problem = f'belongs to uid {info.st_uid}, not to this user (uid {uid})'
    elif info.st_mode & (0o077 if shared else 0o022):
        problem = (f'has mode {stat.S_IMODE(info.st_mode):04o}: other users can '
                   f'{"get into" if shared else "write to"} it')
    if problem is None:
        return path
    fix = ('set INTEGRATION_STATE_DIR to a folder of your own with mode 0700' if shared
           else 'make it yours with mode 0700 (chown, chmod) or set INTEGRATION_STATE_DIR to '
                'a folder of your own')
    raise ConfigError(f'refusing the state directory {path} ({origin}): it {problem}, and files '
                      f'planted there would be trusted and sent to DataKit; {fix}')


def atomic_write(path, text, durable=True):
    """Write-then-rename: a kill leaves the old file or the new one. `durable`:
    the file synced to the disk before the rename and its folder after it,
    so that a power loss leaves one of them too (points spooled: a few ms a
    file)."""
    directory = os.path.dirname(path)
    _makedirs(directory)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix='.tmp-')
    try:
        with os.fdopen(fd, 'w', encoding='utf-8') as f:
            f.write(text)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    finally:
        # Any exit before the rename, a Func timeout included, leaves no temp file.
        with contextlib.suppress(OSError):
            os.remove(tmp)
    if durable:
        sync_folder(directory)
    return path


def sync_folder(directory):
    """A rename or removal in `directory` made durable (where the file system
    allows a folder to be synced)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


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


def in_background(func, *args, name='identity', **kwargs):
    """func(*args, **kwargs) in a thread of its own (integration-<name>); a
    Future of its result. The future is always settled, so whoever waits on
    it never hangs."""
    future = Future()
    threading.Thread(target=_settle, args=(future, func) + args, kwargs=kwargs,
                     name=f'integration-{name}', daemon=True).start()
    return future


def _settle(future, func, *args, **kwargs):
    try:
        future.set_result(func(*args, **kwargs))
    except Exception as e:
        future.set_exception(e)
    finally:
        if not future.done():   # SystemExit and the like: still an answer
            future.set_exception(RuntimeError(f'{callable_name(func)} was interrupted'))


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
        self.reason = None      # why, when not the run's plain end (the Runner's deadline)
        self._cancelled_at = None

    def is_set(self):
        return self._event.is_set()

    def watch(self, client):
        """Make `client` refuse to send once this is cancelled, and note its
        connections. A client watched before (kept from an earlier run: see
        integration_aws_auth.take_client) is this run's from now on; its idle
        connections, noted by that run, are dropped."""
        watched = getattr(client, '_integration_watched', None)
        http = getattr(getattr(client, '_endpoint', None), 'http_session', None)
        if watched is not None:
            watched.cancellation = self
            for manager in [getattr(http, '_manager', None)] + list(
                    (getattr(http, '_proxy_managers', None) or {}).values()):
                if manager is not None:
                    manager.clear()
            return client
        watched = client._integration_watched = _Watched(self)
        events = client.meta.events
        events.register_first('before-send', watched.refuse)
        events.register_first('needs-retry', watched.refuse)
        # botocore keeps its connection pool classes in a per-client dict;
        # subclasses of them note each connection they open. Private API:
        # without it, cancelling still stops new requests and retries.
        pools = getattr(http, '_pool_classes_by_scheme', None)
        if isinstance(pools, dict):
            for scheme, base in list(pools.items()):
                pools[scheme] = watched.noting_pool(base)
        return client

    def cancel(self, reason=None):
        if not self._event.is_set():
            self.reason = reason
            self._cancelled_at = time.monotonic()
        self._event.set()
        # After the event: a connection still connecting now shuts itself.
        for connection in list(self._connections):
            _shut(connection)

    def overdue(self):
        """Cancelled more than STOP_GRACE ago: what has not ended by now (a
        thread asleep between botocore's retries, which no cancelling wakes)
        is not waited for."""
        return self._cancelled_at is not None and time.monotonic() - self._cancelled_at > STOP_GRACE

    def get(self, items):
        """The next of queue `items`; None once overdue without one."""
        while True:
            try:
                return items.get(timeout=0.5)
            except queue.Empty:
                if self.overdue():
                    return None

    def outcome(self, future, what):
        """future.exception() (None: it succeeded); Cancelled, saying `what`
        was not done, once overdue without one."""
        while True:
            try:
                return future.exception(timeout=0.5)
            except FutureTimeout:
                if self.overdue():
                    return Cancelled(self.why(what))

    def why(self, what):
        """Why `what` was not done: the Runner's deadline's reason, or the
        run's end."""
        return self.reason or f'stopped: the run ended before {what}'

    def _refuse(self, **_):
        if self._event.is_set():
            raise Cancelled('the run ended; request not sent')


class _Watched:
    """A watched client's link to the Cancellation of the run using it."""

    def __init__(self, cancellation):
        self.cancellation = cancellation

    def refuse(self, **_):
        self.cancellation._refuse()

    def noting_pool(self, base):
        watched = self

        class NotingPool(base):
            def _new_conn(self):
                cancellation = watched.cancellation
                connection = super()._new_conn()
                cancellation._connections.add(connection)
                connect = connection.connect

                def connect_unless_cancelled():
                    connect()
                    if cancellation.is_set():
                        _shut(connection)
                connection.connect = connect_unless_cancelled
                return connection
        return NotingPool


def _shut(connection):
    sock = getattr(connection, 'sock', None)
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


class Workers:
    """A fixed pool of daemon threads. Unlike ThreadPoolExecutor, nothing
    joins them at interpreter exit, and stop() waits a bounded time. A thread
    starts with the task that needs it (up to `count`), so the first task
    runs at once, not after every thread of the pool has started.

    `share`: at most that many tasks of one `group` (an account) run at once;
    its others wait, in order, for them to end. botocore sleeps between the
    retries of throttled calls on the pool's threads: one throttled account
    must leave the other accounts threads."""

    def __init__(self, count, name, share=None):
        self.size = max(1, count)
        self.share = max(1, min(share or self.size, self.size))
        self._name = name
        self._tasks = queue.Queue()
        self._threads = []
        self._lock = threading.Lock()
        self._stopped = False
        self._running = collections.Counter()   # group -> its tasks queued or running
        self._held = {}                         # group -> its tasks waiting for those

    def submit(self, func, *args, group=None):
        with self._lock:
            if self._stopped:       # no thread would ever run it
                _cancel((func, args))
                return
            if group is not None:
                if self._running[group] >= self.share:
                    self._held.setdefault(group, collections.deque()).append((func, args))
                    return
                self._running[group] += 1
            if len(self._threads) < self.size:
                self._start_thread()
            self._tasks.put((func, args, group))

    def _start_thread(self):
        thread = threading.Thread(target=self._work, daemon=True,
                                  name=f'integration-{self._name}-{len(self._threads)}')
        try:
            thread.start()
        except RuntimeError:
            # "can't start new thread": the threads there are do the work; with
            # none, the caller is told, and nothing was queued.
            if not self._threads:
                raise
            LOG.warning('a %s thread could not start: %d thread(s) do the work',
                        self._name, len(self._threads))
            return
        self._threads.append(thread)

    def run(self, func, *args):
        """func(*args) on the pool: a Future of its result, always settled
        (stop() settles it with an error if it never started)."""
        future = Future()
        self.submit(_settle, future, func, *args)
        return future

    def _work(self):
        while True:
            task = self._tasks.get()
            if task is None:
                return
            func, args, group = task
            try:
                func(*args)
            except Exception as e:  # a task's own bug: said, and the pool goes on with the rest
                LOG.error('[%s] a task failed: %s', self._name, _one_line(e))
                LOG.debug('task traceback:\n%s', traceback.format_exc())
            finally:
                if group is not None:
                    self._next_of(group)

    def _next_of(self, group):
        """A task of `group` ended: its next one waiting takes its place."""
        with self._lock:
            held = self._held.get(group)
            if held and not self._stopped:
                self._tasks.put(held.popleft() + (group,))
            else:
                self._running[group] -= 1

    def stop(self, timeout):
        """Drop the tasks not yet started (the Future of a run() not started
        gets an error, never a hang), end the threads, wait up to `timeout`."""
        with self._lock:        # first: no task comes in after the drop
            self._stopped = True
            threads = list(self._threads)
            held, self._held = self._held, {}
        for tasks in held.values():
            for task in tasks:
                _cancel(task)
        while True:
            try:
                task = self._tasks.get_nowait()
            except queue.Empty:
                break
            if task is not None:
                _cancel(task[:2])
        for _ in threads:
            self._tasks.put(None)
        deadline = time.monotonic() + timeout
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))


@contextlib.contextmanager
def held(semaphore, cancellation, what):
    """The block runs holding `semaphore` (a bound of requests in flight);
    Cancelled, saying `what` was not done, when the run ends first."""
    while True:
        if cancellation.is_set():
            raise Cancelled(cancellation.why(what))
        if semaphore.acquire(timeout=0.5):
            break
    try:
        yield
    finally:
        semaphore.release()


def _cancel(task):
    """A task that will never run: the Future of a Workers.run() gets an
    error, so that whoever waits on it never hangs."""
    func, args = task
    if func is _settle and not args[0].done():
        args[0].set_exception(Cancelled('the run ended before this was done'))


def check_keys(mapping, known, where, error=None, elsewhere=((), None)):
    """Every key of `mapping` is one of `known`; else one line naming the
    unknown key and the nearest known one (or all of them), or where it
    belongs when it is one of the keys `elsewhere` = (keys, that dict's name)."""
    for key in mapping:
        if key in known:
            continue
        if key in elsewhere[0]:
            raise (error or ConfigError)(f'{where}[{key!r}] belongs in {elsewhere[1]}, not in {where}: '
                                         'move it there')
        raise (error or ConfigError)(f'{where}[{key!r}] is not a known key; '
                                     f'{suggest(key, known, "known keys")}')


def suggest(value, known, kind):
    """'did you mean <the nearest of known>?', or else the list of them."""
    near = difflib.get_close_matches(str(value), list(known), n=1, cutoff=0.6)
    return f'did you mean {near[0]!r}?' if near else f'{kind}: ' + ', '.join(map(str, known))


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


def apply_hooks(point, filters, after_collect, result, subject):
    """A user's filters and after_collect on one point. A hook that raises is
    named with the subject (e.g. 'instance i-0abc'), counted against the
    region's result (its first such error becomes the region's error), and
    the point is left out: never a quietly partial inventory."""
    hook = None
    try:
        if filters:
            merged = {**point['tags'], **point['fields']}
            for index, check in enumerate(filters):
                hook = f'filters[{index}] ({callable_name(check)})'
                if not check(merged):
                    return None
        if after_collect is not None:
            hook = f'after_collect ({callable_name(after_collect)})'
            point = after_collect(point)
    except Exception as e:
        message = f'{hook} raised {type(e).__name__}: {e} on {subject}'
        result['hook_errors'] = result.get('hook_errors', 0) + 1
        if not result.get('error'):
            result['error'] = message
        LOG.error('[%s] %s', result['region'], message)
        return None
    return point


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
    # `-m` puts the current folder first on sys.path, where a startup script
    # named like a library module (org.py, which `copy` probes for; secrets.py)
    # would replace that module: take it off, as integration-runner has it.
    import sys
    here = os.path.abspath(os.getcwd())
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != here]
    sys.path.append(os.path.dirname(os.path.abspath(__file__)))
    from integration_local.cli import main
    sys.exit(main())
