"""CloudWatch metrics collector: the datapoints of the configured namespaces
and metrics, every period, as DataFlux metrics (measurement `aws_<Namespace>`,
e.g. `aws_AWS/EC2`), each carrying the tags of the object it measures.

Public entry points
    DataCollector(account, configs, filters=None, after_collect=None)
        The startup scripts' `cloudwatch.DataCollector(account, collector_configs)`.
        Put it last in the Runner, after the object collectors whose tags it
        copies (EC2: the instance of `InstanceId`). The constructor validates
        and does no I/O.

collector_configs keys
    regions             as for EC2: ['cn-northwest-1', ...] or ['*'].
    targets             list of {'namespace': 'AWS/EC2', 'metrics': [...],
                        'dimensions': [...]} (default [{'namespace': 'AWS/EC2'}]).
                        metrics: names with `*` wildcards, OR'd ('CPU*',
                        '*Credit*'); a list whose first item is 'NOT' excludes
                        what it names; 'ALL' or ['*'] is every metric. Default:
                        the EC2 set of compat.md for AWS/EC2, else every metric.
                        dimensions: the exact set of dimension names a series
                        must have (default: InstanceId for EC2,
                        DBInstanceIdentifier for RDS, LoadBalancerName for ELB,
                        LoadBalancer for ALB/NLB/GWLB, CacheClusterId for
                        ElastiCache; any set for S3, ES and other namespaces;
                        'ALL' or ['*'] means any). Targets with the same
                        namespace narrow one another: a series is kept when it
                        passes each of them, top to bottom.
    period              60 or 300 seconds (default 300).
    statistics          some of Average, Maximum, Minimum, SampleCount, Sum
                        (default all five).
    delay               seconds behind now that the read window ends (default
                        600 for period 300 and 180 for period 60: AWS delivers
                        basic EC2 metrics 5-10 min late, detailed ones about 2).
    concurrency         GetMetricData calls at once (default 4, 1..16).
    discovery_interval  seconds a ListMetrics answer is reused (default 3600).
    backfill            seconds a run reaches back after missed runs (default
                        and most 10800: ListMetrics' RecentlyActive=PT3H).
    retry_mode, max_attempts   as for EC2.

Output (compat.md section 4): category `metric`, measurement `aws_<Namespace>`,
one point per series and CloudWatch bucket, at the bucket's own time; tags: the
dimensions, RegionId, cloud_provider=AWS, the account's extra_tags and the
linked object's tags (all but `name`; the metric's own tags win); fields
`<MetricName>_<Statistic>` as floats. A statistic without data is left out,
never written as zero; a bucket without data is not written.

Calls and cost (AWS bills GetMetricData per metric requested): series come from
ListMetrics (RecentlyActive=PT3H, every page), kept for discovery_interval; only
those are queried, all statistics of a series in one call, at most 500 queries
a call, NextToken followed. A region is read when a new bucket has closed
(period and delay passed), over a window aligned to the period that re-reads
the REREAD_BUCKETS before it for late datapoints; which buckets each series
has written is kept, so each bucket is written once across runs.

IAM permissions: cloudwatch:ListMetrics, cloudwatch:GetMetricData,
ec2:DescribeRegions (only for ['*']), plus what the account's method needs
(integration_aws_auth).
"""
import hashlib
import logging
import queue
import re
import threading
import time

from botocore.config import Config
from botocore.exceptions import ClientError

import integration_core__runner as core

try:
    # Its script id in Func (the README's paste table); in a checkout or a pip
    # install the module keeps its file name.
    import integration_aws__auth as auth
except ImportError as e:
    if e.name != 'integration_aws__auth':
        raise
    try:
        import integration_aws_auth as auth
    except ImportError as e2:
        if e2.name != 'integration_aws_auth':
            raise
        raise ImportError('integration_aws_cloudwatch__main needs integration_aws_auth.py: paste '
                          'it into Func as the script set `integration_aws`, script `auth` (script '
                          'id integration_aws__auth), as the README says') from None

LOG = logging.getLogger('integration.aws.cloudwatch')

CONFIG_KEYS = ('regions', 'targets', 'period', 'statistics', 'delay', 'concurrency',
               'discovery_interval', 'backfill', 'retry_mode', 'max_attempts')
TARGET_KEYS = ('namespace', 'metrics', 'dimensions')
STATISTICS = ('Average', 'Maximum', 'Minimum', 'SampleCount', 'Sum')
PERIODS = (60, 300)
DEFAULT_DELAY = {60: 180, 300: 600}
DEFAULTS = {'period': 300, 'statistics': STATISTICS, 'concurrency': 4,
            'discovery_interval': 3600, 'backfill': 3 * 3600}
MAX_CONCURRENCY = 16
MAX_QUERIES = 500            # GetMetricData's fixed limit per call
REREAD_BUCKETS = 2           # closed buckets read again for late datapoints
MASK_BUCKETS = 63            # how far back "written" is remembered, in buckets
NAMESPACE_RE = re.compile(r'^[^:][^:]{0,254}$')
# compat.md's default EC2 set.
EC2_METRICS = (
    'CPUUtilization', 'DiskReadOps', 'DiskWriteOps', 'DiskReadBytes', 'DiskWriteBytes',
    'MetadataNoToken', 'NetworkIn', 'NetworkOut', 'NetworkPacketsIn', 'NetworkPacketsOut',
    'CPUCreditUsage', 'CPUCreditBalance', 'CPUSurplusCreditBalance', 'CPUSurplusCreditsCharged',
    'StatusCheckFailed', 'StatusCheckFailed_Instance', 'StatusCheckFailed_System')
# The dimensions of a namespace's per-resource series; None: any set.
DEFAULT_DIMENSIONS = {
    'AWS/EC2': ('InstanceId',), 'AWS/RDS': ('DBInstanceIdentifier',),
    'AWS/ELB': ('LoadBalancerName',), 'AWS/ApplicationELB': ('LoadBalancer',),
    'AWS/NetworkELB': ('LoadBalancer',), 'AWS/GatewayELB': ('LoadBalancer',),
    'AWS/ElastiCache': ('CacheClusterId',), 'AWS/S3': None, 'AWS/ES': None,
}
BUILT_IN_TAGS = ('RegionId', 'cloud_provider')


class DataCollector(auth.AwsCollector):
    """One account's CloudWatch metrics in the configured regions (an
    Organization's: every member account's)."""

    title = 'AWS CloudWatch'
    category = 'metric'
    min_interval = core.MIN_INTERVAL['metric']

    name = 'aws_cloudwatch'
    built_in_tags = BUILT_IN_TAGS

    def __init__(self, account, configs=None, filters=None, after_collect=None, *,
                 cache=None, clock=None, now=time.time):
        super().__init__(account, configs, filters, after_collect, cache=cache, clock=clock)
        self.targets = self.configs['targets']
        self.cache = cache
        self.now = now
        self.objects = {}
        self._records = []          # what commit() saves
        self._run = None

    @staticmethod
    def validate_configs(configs):
        return validate_configs(configs)

    @property
    def record_scope(self):
        """What decides a region's series and the points they write, for the
        keys of its discovery and written-bucket records: not the tuning
        options (concurrency, retries, delay, backfill, discovery_interval)
        nor the other regions, whose change must not write buckets again."""
        # The account is in the key itself (the one that answered): not the
        # credentials that reach it (a rotated key), nor the accounts an
        # Organization lists; its extra_tags are in the points.
        who = {'extra_tags': self.account.get('extra_tags', {})}
        # The targets as they select, whatever their spelling or order ('ALL'
        # or ['*'], a default written out).
        targets = sorted(
            [t['namespace'], None if t['include'] is None else sorted(p.pattern for p in t['include']),
             t['exclude'], None if t['dimensions'] is None else sorted(t['dimensions'])]
            for t in self.configs['targets'])
        # Not the statistics either: one added appears from the next bucket on.
        decisive = {'period': self.configs['period'], 'targets': targets}
        return f'{self.name}:' + core.fingerprint(who, decisive, self.filters, self.after_collect)

    def own_tags(self):
        # A series' dimensions are its tags (the targets' own, or a
        # namespace's default ones: a target of any dimensions adds none here).
        dimensions = {name for target in self.configs['targets'] for name in target['dimensions'] or ()}
        return super().own_tags() + tuple(sorted(dimensions))

    # -- what the Runner calls -------------------------------------------------

    def link_objects(self, objects):
        """The Runner hands over {object name: tags} of the object collectors
        that ran before (or their last run's, kept between runs)."""
        self.objects = objects or {}

    def start(self):
        """Begin: the identity call and each region's discovery, in the background."""
        if self._run is not None:
            return
        config = self._client_config()
        # A GetMetricData request is 500 queries we built ourselves: botocore's
        # validation of them was a quarter of the collection's CPU.
        metrics_config = config.merge(Config(parameter_validation=False))
        # Of an Organization, an account's calls take at most half the pool at
        # once (a throttled account leaves the others room: Workers).
        size = self.configs['concurrency']
        pool = core.Workers(size, 'cloudwatch', share=size // 2 if self.aws.organization else None)
        run = {'out': queue.Queue(), 'stop': self.new_cancellation(), 'pool': pool, 'regions': []}
        # From here on cancel() ends it all, however start() itself ends
        # (Func's timeout included, which no `except Exception` sees).
        self._run = run
        stop = run['stop']
        self.aws.start_identity(stop, config)
        regions = self.aws.resolve_regions(config)
        self.results = []
        lock = threading.Lock()

        def ready(member):
            """Start the member's regions as soon as it has a session (an
            account whose role hangs holds up no other)."""
            mine = self._member_regions(member, regions, config)
            with lock:      # a session is not thread-safe to make clients from
                for region in mine:
                    result = _new_result(region, member if self.aws.organization else None)
                    client = stop.watch(auth.take_client(member.session, 'cloudwatch', region,
                                                         metrics_config))
                    self.results.append(result)
                    run['regions'].append(_Region(self, member, client, result, run))
                    pool.submit(run['regions'][-1].discover, group=member.account_id)

        members = self.aws.members(stop, pool, self.aws.fresh, ready=ready)
        if not self.aws.organization:
            ready(members[0])
        # In the accounts' order, whatever order their roles were assumed in.
        order = {m.account_id: n for n, m in enumerate(members)}
        self.results.sort(key=lambda r: (order[r.get('account')], r['region'] if regions is None
                                         else regions.index(r['region'])))

    def _member_regions(self, member, regions, config):
        """The member's regions (its own enabled ones for ['*'] over an
        Organization); when they cannot be looked up, that account fails
        (one line), not the run."""
        try:
            return self.aws.member_regions(member, regions, config)
        except auth.AuthError as e:
            member.error, member.session = str(e), None
            return []

    def _collect(self):
        """Yield points as each GetMetricData call's answer arrives; fill
        self.results. Which buckets were written is saved by commit(), once
        the Runner has delivered (or spooled) the points."""
        self.start()
        run, self._run = self._run, None
        try:
            pending = set(run['regions'])
            while pending:
                item = run['stop'].get(run['out'])
                if item is None:
                    # Stopped, and a region's thread is still asleep between
                    # botocore's retries: not waited for, its region failed.
                    for region in pending:
                        region.result['error'] = region.stopped()
                        region.finish()
                    return
                kind, region, payload = item
                if kind == 'points':
                    yield from payload
                else:
                    pending.discard(region)
                    region.finish()
                    if region.window is not None:
                        self._records.append(region.save_state)
        finally:
            run['stop'].cancel()
            run['pool'].stop(core.STOP_GRACE)
        # Every region ended and no thread uses them: the next run's (not a
        # run the deadline cut short: its connections were shut).
        if run['stop'].reason is None:
            self.keep_clients([region.client for region in run['regions']])

    def commit(self):
        """The Runner delivered (or spooled) every point collect() yielded: now
        record which buckets each series has written. Not before: a run cut
        short (Func's timeout) or a debug run must leave them to be read again."""
        records, self._records = self._records, []
        for save in records:
            save()

    def cancel(self):
        run, self._run = self._run, None
        if run is not None:
            run['stop'].cancel()
            run['pool'].stop(core.STOP_GRACE)
            self.results = []

    def check(self):
        """Probe each account and region: cloudwatch:ListMetrics and
        cloudwatch:GetMetricData."""
        end = int(self.now()) // 60 * 60
        namespace = self.targets[0]['namespace']

        def probe(client, region):
            listed = client.list_metrics(Namespace=namespace, RecentlyActive='PT3H')['Metrics']
            metric = listed[0] if listed else {'Namespace': namespace, 'MetricName': 'CPUUtilization',
                                               'Dimensions': []}
            client.get_metric_data(MetricDataQueries=[{'Id': 'q0', 'MetricStat': {
                'Metric': metric, 'Period': 60, 'Stat': 'SampleCount'}}],
                StartTime=end - 3600, EndTime=end)
            return (f'cloudwatch:ListMetrics and cloudwatch:GetMetricData allowed ({len(listed)} '
                    f'{namespace} series on the first page)')
        return auth.check_accounts(
            self.aws, self._client_config(), 'cloudwatch', probe,
            lambda error, region: explain_error(error, 'cloudwatch:ListMetrics/GetMetricData'))

    def cache_store(self):
        """Where discovery and the written buckets are kept: DFF.CACHE (inside
        Func this script's own scope), unless a cache was given."""
        if self.cache is not None:
            return self.cache
        dff = globals().get('DFF')
        return dff.CACHE if dff is not None else core.default_cache()


class _Region:
    """One region's collection: discovery, then GetMetricData calls on the
    collector's pool; each call's answer becomes points on the output queue."""

    def __init__(self, collector, member, client, result, run):
        self.collector = collector
        self.member = member
        self.client = client
        self.result = result
        self.run = run
        self.region = result['region']
        self.lock = threading.Lock()
        self.calls_left = 0
        self.series = []
        self.window = None
        self.state = None           # the record loaded: {'period', 'end', 'written', 'missing', 'seen'}
        self.masks = {}             # this run's masks, re-based to the window's end
        self.started = time.monotonic()

    def discover(self):
        """Worker: the series to read (cached ListMetrics), the window, and the
        GetMetricData calls, submitted to the pool."""
        try:
            self.series = self._series()
            self.result['series'] = len(self.series)
            self.state = self._load_record()
            self.window = self._window()
            if self.window is None:
                self.result['note'] = 'no new bucket has closed since the last run'
            chunks = self._chunks() if self.window and self.series else []
            self.calls_left = len(chunks)
            for chunk, window in chunks:
                self.run['pool'].submit(self._read, chunk, window, group=self.member.account_id)
        except Exception as e:
            self.result['error'] = self._explain(e, 'cloudwatch:ListMetrics')
            chunks = []
        if not chunks:
            self._done()

    def finish(self):
        """Main thread, after every point of the region was yielded (or the
        run stopped waiting for it)."""
        if not self.result['seconds']:
            self.result['seconds'] = round(time.monotonic() - self.started, 3)
        self.result['buckets'] = len(self.result['buckets'])
        self.result['messages'] = sorted(self.result['messages'])
        self.result['summary'] = _summary(self.result)

    # -- discovery ----------------------------------------------------------

    def _series(self):
        cache, key = self._cache(), self._key('series')
        cached = core.unpack_json(core.cache_get(cache, key))
        if isinstance(cached, list):
            self.result['discovery'] = 'cached'
            return [_Series(*row) for row in cached]
        found = []
        for namespace, targets in _by_namespace(self.collector.targets).items():
            params = {'Namespace': namespace, 'RecentlyActive': 'PT3H'}
            fixed = _fixed_dimensions(targets)
            if fixed:
                # Narrows the answer to series that have these dimensions
                # (and maybe others: the exact set is checked below).
                params['Dimensions'] = [{'Name': name} for name in sorted(fixed)]
            while True:
                resp = self._call('list_metrics', **params)
                for metric in resp.get('Metrics', []):
                    dims = tuple(sorted((d['Name'], d['Value']) for d in metric.get('Dimensions', [])))
                    if all(_matches(t, metric['MetricName'], dims) for t in targets):
                        found.append(_Series(namespace, metric['MetricName'], dims))
                params['NextToken'] = resp.get('NextToken')
                if not params['NextToken']:
                    break
        found.sort(key=lambda s: (s.namespace, s.metric, s.dims))
        self.result['discovery'] = 'ListMetrics'
        try:
            cache.set(key, core.pack_json([[s.namespace, s.metric, [list(d) for d in s.dims]]
                                           for s in found]),
                      expires=self.collector.configs['discovery_interval'])
        except Exception as e:   # a full or broken cache costs ListMetrics calls, not data
            LOG.warning('[%s] cannot keep the ListMetrics answer: %s', self.region, core.first_line(e))
        return found

    # -- the window ---------------------------------------------------------

    def _load_record(self):
        """The region's record of written buckets; else the one the version
        before kept under state_key (taken over once: an upgrade writes no
        bucket again); None when there is none, or when it ends after now."""
        collector = self.collector
        period = collector.configs['period']
        state = _load_state(self._cache(), self._key('written'), period)
        if state is None:
            state = _load_state(self._cache(), self._key('written', collector.state_key), period)
        now = collector.now()
        if state and state['end'] > now + period:
            # No bucket can have closed after now: saved by a run whose clock
            # was ahead. Believed, it would hold every run back until it expired.
            LOG.warning('[%s] the record of written buckets ends at %s, ahead of this clock: '
                        'starting it again', self.region,
                        time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(state['end'])))
            return None
        return state

    def _window(self):
        """[start, end) aligned to the period: end is the last closed bucket
        (delay included), start reaches back over the buckets since the last
        run (at most `backfill`) and REREAD_BUCKETS more for late data. None
        when no bucket closed since the last run."""
        configs = self.collector.configs
        period = configs['period']
        end = int(self.collector.now() - configs['delay']) // period * period
        last_end = self.state['end'] if self.state else None
        # Where a series may still miss buckets: the last run's end, or
        # earlier when a call of a run before failed (see save_state).
        since = _since(self.state, {series.sid for series in self.series})
        if last_end is not None and end <= last_end:
            if since >= last_end:
                return None
            end = last_end          # no new bucket: only the ones a failure left
        if since is None:
            since = end - period
        start = max(since - REREAD_BUCKETS * period, end - configs['backfill'])
        return start, end

    def _chunks(self):
        """(series, window) of each call: all statistics of a series in the
        same call, at most 500 queries a call. A series the record has not seen
        (found by a later ListMetrics: a new instance) is read back over its
        own, wider window, `backfill` (within the record's reach), so that
        its buckets from before it was found are written too."""
        configs = self.collector.configs
        per_call = max(1, MAX_QUERIES // len(configs['statistics']))
        start, end = self.window
        seen = self.state.get('seen') if self.state else None
        known, new = self.series, []
        if isinstance(seen, list):
            seen = set(seen)
            known = [series for series in self.series if series.sid in seen]
            new = [series for series in self.series if series.sid not in seen]
        # (`start` already reaches back to where a failed call left one.)
        reach = max(end - configs['backfill'], end - (MASK_BUCKETS - 1) * configs['period'])
        out = []
        for group, window in ((known, self.window), (new, (min(start, reach), end))):
            out.extend((group[i:i + per_call], window) for i in range(0, len(group), per_call))
        return out

    # -- GetMetricData ------------------------------------------------------

    def _read(self, chunk, window):
        """Worker: one GetMetricData call (every NextToken page) for a chunk
        of series over `window`; its points onto the output queue."""
        configs = self.collector.configs
        statistics = configs['statistics']
        start, end = window
        queries = []
        for index, series in enumerate(chunk):
            metric = {'Namespace': series.namespace, 'MetricName': series.metric,
                      'Dimensions': [{'Name': n, 'Value': v} for n, v in series.dims]}
            for stat_index, stat in enumerate(statistics):
                queries.append({'Id': f'q{index * len(statistics) + stat_index}', 'ReturnData': True,
                                'MetricStat': {'Metric': metric, 'Period': configs['period'],
                                               'Stat': stat}})
        values = {}                     # query index -> {bucket second: value}
        try:
            params = {'MetricDataQueries': queries, 'StartTime': start, 'EndTime': end,
                      'ScanBy': 'TimestampAscending'}
            while True:
                resp = self._call('get_metric_data', **params)
                for answer in resp.get('MetricDataResults', []):
                    got = values.setdefault(int(answer['Id'][1:]), {})
                    for stamp, value in zip(answer.get('Timestamps', ()), answer.get('Values', ())):
                        got[_epoch(stamp)] = value
                    if answer.get('Messages'):
                        self.result['messages'].update(m.get('Value', '') for m in answer['Messages'])
                params['NextToken'] = resp.get('NextToken')
                if not params['NextToken']:
                    break
            with self.lock:
                self.result['queries'] += len(queries)
            points = self._points(chunk, values, window)
            self.run['out'].put(('points', self.region, points))
        except Exception as e:
            with self.lock:
                if not self.result['error']:
                    self.result['error'] = self._explain(e, 'cloudwatch:GetMetricData')
        finally:
            with self.lock:
                self.calls_left -= 1
                last = self.calls_left == 0
            if last:
                self._done()

    def _points(self, chunk, values, window):
        collector = self.collector
        statistics = collector.configs['statistics']
        period = collector.configs['period']
        start, end = window
        written = self.state['written'] if self.state else {}
        last_end = self.state['end'] if self.state else None
        # Series a failed call left without their buckets from their own
        # `since` on: those are unwritten, however far back the mask reaches.
        missing = self.state.get('missing', {}) if self.state else {}
        masks = {}
        out = []
        for index, series in enumerate(chunk):
            by_bucket = {}
            for stat_index, stat in enumerate(statistics):
                for second, value in values.get(index * len(statistics) + stat_index, {}).items():
                    by_bucket.setdefault(second, {})[f'{series.metric}_{stat}'] = float(value)
            old_mask = written.get(series.sid, 0)
            new_mask = _shift(old_mask, last_end, end, period)
            base = None
            for second in sorted(by_bucket):
                if not start <= second < end or second % period:
                    continue
                if _was_written(old_mask, last_end, second, period,
                                pending=second >= missing.get(series.sid, end)):
                    continue
                if base is None:
                    base = self._tags(series)
                point = {'measurement': 'aws_' + series.namespace, 'tags': dict(base),
                         'fields': by_bucket[second], 'timestamp': second * 1_000_000_000}
                point = core.apply_hooks(point, collector.filters, collector.after_collect,
                                         self.result, f'series {series.label}')
                new_mask |= _bit(end, second, period)
                if point is not None:
                    out.append(point)
            masks[series.sid] = new_mask
        with self.lock:
            self.result['points'] += len(out)
            self.result['buckets'].update(p['timestamp'] for p in out)
            self.masks.update(masks)
        return out

    def save_state(self):
        """The record of written buckets, re-based to this window's end. A
        series this run did not answer for (a failed call) keeps its old bits,
        and the record keeps, for each such series, where its missing buckets
        begin: the next run reads back to there, so a failed call leaves no
        gap (up to `backfill`)."""
        configs = self.collector.configs
        period, (start, end) = configs['period'], self.window
        masks = {}
        if self.state:
            for sid, mask in self.state['written'].items():
                if isinstance(mask, int):
                    masks[sid] = _shift(mask, self.state['end'], end, period)
        masks.update(self.masks)
        record = {'period': period, 'end': end,
                  'written': {sid: mask for sid, mask in masks.items() if mask}}
        current = {series.sid for series in self.series}
        before = self.state.get('missing', {}) if self.state else {}
        complete_until = self.state['end'] if self.state else start
        # A series missing already keeps where it began to miss (also while
        # a ListMetrics answer leaves it out); one missing now misses from
        # the last run's end (it was whole until there). Beyond `backfill`,
        # nothing is read back.
        missing = {sid: since for sid, since in before.items() if sid not in current}
        missing.update((sid, before.get(sid, complete_until)) for sid in current - set(self.masks))
        record['missing'] = {sid: max(since, end - configs['backfill'])
                             for sid, since in sorted(missing.items()) if since >= end - configs['backfill']
                             or sid in current}
        # The series read so far, of those listed now: one not yet answered,
        # or listed again, is new (read back over backfill).
        seen = set(self.state.get('seen') or ()) if self.state else set()
        record['seen'] = sorted(current & (seen | set(self.masks)))
        try:
            self._cache().set(self._key('written'), core.pack_json(record),
                              expires=configs['backfill'] + 3600)
        except Exception as e:
            LOG.warning('[%s] cannot keep the record of written buckets: %s', self.region,
                        core.first_line(e))

    def _tags(self, series):
        collector = self.collector
        tags = {}
        link = _link_dimension(collector.targets, series.namespace)
        if link:
            name = dict(series.dims).get(link)
            tags.update(collector.objects.get(name) or {})
        tags.update(collector.extra_tags)
        tags.update(self.member.tags)
        own = BUILT_IN_TAGS + collector.account_tags
        for name, value in series.dims:
            # A dimension named like a tag we write (a custom namespace's
            # RegionId) keeps its value under <name>_dimension: overwritten,
            # two series would be one.
            tags[f'{name}_dimension' if name in own else name] = value
        tags['RegionId'] = self.region
        tags['cloud_provider'] = 'AWS'
        return core.clean_tags(tags)

    # -- plumbing -----------------------------------------------------------

    def _call(self, operation, **params):
        """One API call, counted (retries included) in the region's result."""
        name = ''.join(part.title() for part in operation.split('_'))
        try:
            resp = getattr(self.client, operation)(**params)
        except ClientError as e:
            self._count(name, e.response.get('ResponseMetadata', {}))
            auth.note_refusal(self.result, e)
            raise
        self._count(name, resp['ResponseMetadata'])
        return resp

    def _count(self, name, metadata):
        with self.lock:
            self.result['api_calls'] += 1 + metadata.get('RetryAttempts', 0)
            self.result['calls'][name] = self.result['calls'].get(name, 0) + 1

    def _done(self):
        self.result['seconds'] = round(time.monotonic() - self.started, 3)
        self.run['out'].put(('done', self, None))

    def _explain(self, error, action):
        if self.run['stop'].is_set():
            return self.stopped()
        return explain_error(error, action)

    def stopped(self):
        """The region's error when the run ended before it finished."""
        return self.run['stop'].why('this region was collected')

    def _cache(self):
        return self.collector.cache_store()

    def _key(self, what, scope=None):
        # By the account that answered, not only the keys that asked: two
        # machines' instance roles share a Func's Redis.
        account_id = self.member.account_id or self.collector.identity().get('account_id')
        if scope is None:
            scope = self.collector.record_scope
            if what == 'written' and self.member.tags:
                # An Organization's points carry the account's tags (AccountId,
                # AccountName when listed): other series than those of a
                # script of that account alone, each with buckets of its own.
                scope += ':' + '+'.join(sorted(self.member.tags))
        return f'integration_aws_cloudwatch:{what}:{scope}:{account_id}:{self.region}'


class _Series:
    """One CloudWatch series: namespace, metric name, sorted dimension pairs."""
    __slots__ = ('namespace', 'metric', 'dims', 'sid')

    def __init__(self, namespace, metric, dims):
        self.namespace = namespace
        self.metric = metric
        self.dims = tuple(tuple(d) for d in dims)
        self.sid = hashlib.sha1(repr((namespace, metric, self.dims)).encode()).hexdigest()[:12]

    @property
    def label(self):
        return f"{self.metric} {','.join(f'{n}={v}' for n, v in self.dims)}"


# --------------------------------------------------------------------------
# Which buckets a series has written: a bitmask per series
# --------------------------------------------------------------------------
# Bit i of a series' mask, relative to the window end E it was saved with,
# stands for the bucket that starts at E - (i + 1) * period.

def _bit(end, second, period):
    offset = (end - second) // period - 1
    return 1 << offset if 0 <= offset < MASK_BUCKETS else 0


def _was_written(mask, last_end, second, period, pending=False):
    if last_end is None or second >= last_end:
        return False
    offset = (last_end - second) // period - 1
    if offset >= MASK_BUCKETS:
        # Older than the mask reaches: written, or never to be written again;
        # unless a failed call left it (`pending`).
        return not pending
    return bool(mask >> offset & 1)


def _shift(mask, last_end, end, period):
    """A mask saved at last_end, re-based to end (later): older bits move up."""
    if last_end is None or not mask:
        return 0
    steps = (end - last_end) // period
    return (mask << steps) & ((1 << MASK_BUCKETS) - 1) if steps < MASK_BUCKETS else 0


def _since(state, listed):
    """The first bucket a series `listed` (by sid) may still miss: the last
    run's end, or earlier where a failed call left it without its buckets;
    None without a record. A series not listed now waits, its mark kept, and
    widens no window."""
    if not state:
        return None
    missing = state.get('missing', {})
    return min([state['end']] + [missing[sid] for sid in listed if sid in missing])


def _load_state(cache, key, period):
    state = core.unpack_json(core.cache_get(cache, key))
    valid = (isinstance(state, dict) and state.get('period') == period
             and isinstance(state.get('end'), int) and isinstance(state.get('written'), dict)
             and all(isinstance(m, int) for m in state['written'].values())
             and isinstance(state.get('missing', {}), dict)
             and all(type(m) is int for m in state.get('missing', {}).values())
             and isinstance(state.get('seen', []), list) and all(isinstance(x, str) for x in state.get('seen', [])))
    if state is not None and not valid:
        LOG.warning('[AWS CloudWatch] ignoring an unreadable record of written buckets')
    return state if valid else None


# --------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------

def validate_configs(configs):
    where = 'collector_configs'
    if not isinstance(configs, dict):
        raise core.ConfigError(f"{where} must be a dict such as {{'regions': ['cn-northwest-1'], "
                               f"'targets': [{{'namespace': 'AWS/EC2'}}]}}, not {type(configs).__name__}")
    core.check_keys(configs, CONFIG_KEYS, where, elsewhere=(auth.KNOWN_KEYS, 'account'))
    out = dict(DEFAULTS)
    out.update(configs)
    out['regions'] = auth.check_regions(configs.get('regions'), f"{where}['regions']")
    if type(out['period']) is not int or out['period'] not in PERIODS:
        raise core.ConfigError(f"{where}['period'] must be 60 or 300 seconds (got {out['period']!r})")
    out['statistics'] = _check_statistics(out['statistics'], f"{where}['statistics']")
    if out.get('delay') is None:
        out['delay'] = DEFAULT_DELAY[out['period']]
    core.check_int(out, 'delay', 0, 3600, where)
    core.check_int(out, 'concurrency', 1, MAX_CONCURRENCY, where)
    core.check_int(out, 'discovery_interval', 60, 86400, where)
    core.check_int(out, 'backfill', out['period'], 3 * 3600, where)
    auth.check_retry_options(out, where)
    out['targets'] = _check_targets(configs.get('targets', [{'namespace': 'AWS/EC2'}]),
                                    f"{where}['targets']")
    return out


def _check_statistics(statistics, where):
    if isinstance(statistics, str) or not isinstance(statistics, (list, tuple)) or not statistics:
        raise core.ConfigError(f'{where} must be a non-empty list such as {list(STATISTICS)!r}')
    out = []
    for index, stat in enumerate(statistics):
        if stat not in STATISTICS:
            raise core.ConfigError(f'{where}[{index}] {stat!r} is not a statistic; '
                                   f'{core.suggest(stat, STATISTICS, "statistics")}')
        if stat not in out:
            out.append(stat)
    return out


def _check_targets(targets, where):
    if isinstance(targets, dict):
        targets = [targets]
    if not isinstance(targets, (list, tuple)) or not targets:
        raise core.ConfigError(f"{where} must be a non-empty list such as "
                               "[{'namespace': 'AWS/EC2', 'metrics': ['CPU*']}]")
    out = []
    for index, target in enumerate(targets):
        here = f'{where}[{index}]'
        if not isinstance(target, dict):
            raise core.ConfigError(f"{here} must be a dict such as {{'namespace': 'AWS/EC2'}}, "
                                   f'not {type(target).__name__}')
        core.check_keys(target, TARGET_KEYS, here)
        namespace = target.get('namespace')
        if (not isinstance(namespace, str) or not NAMESPACE_RE.match(namespace)
                or namespace != namespace.strip() or not namespace.isascii()):
            raise core.ConfigError(f"{here}['namespace'] must be a CloudWatch namespace such as "
                                   f"'AWS/EC2' (got {namespace!r})")
        known = {name.upper(): name for name in DEFAULT_DIMENSIONS}.get(namespace.upper())
        if known and known != namespace:
            # Namespaces are case-sensitive: this one would match no metric.
            raise core.ConfigError(f"{here}['namespace'] {namespace!r} matches no metric: "
                                   f"CloudWatch namespaces are case-sensitive; did you mean {known!r}?")
        if 'metrics' in target:
            include, exclude = _check_metrics(target['metrics'], f"{here}['metrics']")
        elif namespace == 'AWS/EC2':
            include, exclude = [re.compile(re.escape(m) + r'\Z') for m in EC2_METRICS], False
        else:
            include, exclude = None, False
        dims = (_check_dimensions(target['dimensions'], f"{here}['dimensions']")
                if 'dimensions' in target else DEFAULT_DIMENSIONS.get(namespace))
        out.append({'namespace': namespace, 'include': include, 'exclude': exclude,
                    'dimensions': frozenset(dims) if dims is not None else None,
                    'link': dims[0] if dims is not None and len(dims) == 1 else None,
                    'given': {k: target[k] for k in TARGET_KEYS if k in target}})
    _check_narrowing(out, where)
    return out


def _check_narrowing(targets, where):
    """Targets of one namespace narrow one another and a series has one set
    of dimension names: two different exact sets would keep nothing, in
    silence (a user who meant "either" would get no point)."""
    first = {}
    for index, target in enumerate(targets):
        dims = target['dimensions']
        if dims is None:
            continue
        earlier, earlier_dims = first.setdefault(target['namespace'], (index, dims))
        if earlier_dims != dims:
            def shown(i, d):
                return f"{sorted(d)}" + ('' if 'dimensions' in targets[i]['given'] else
                                         f" (the default for {targets[i]['namespace']})")
            raise core.ConfigError(
                f"{where}[{index}] keeps the series with the dimensions {shown(index, dims)} and "
                f"{where}[{earlier}] those with {shown(earlier, earlier_dims)}: targets of one "
                'namespace narrow one another (a series must pass each), so together they keep '
                "nothing; give them the same 'dimensions', or 'ALL' to one of them")


def _check_metrics(metrics, where):
    """(patterns or None for all, exclude?)."""
    if metrics == 'ALL' or metrics == ['*']:
        return None, False
    if isinstance(metrics, str) or not isinstance(metrics, (list, tuple)) or not metrics:
        raise core.ConfigError(f"{where} must be 'ALL' or a non-empty list of metric names, with * "
                               "as a wildcard (e.g. ['CPU*', 'NetworkIn']); ['NOT', ...] excludes")
    exclude = metrics[0] == 'NOT'
    names = list(metrics[1:] if exclude else metrics)
    if exclude and not names:
        raise core.ConfigError(f"{where}: ['NOT'] excludes nothing: name what to exclude after 'NOT'")
    patterns = []
    for index, name in enumerate(names, 1 if exclude else 0):
        if not isinstance(name, str) or not name.strip() or name == 'NOT':
            raise core.ConfigError(f'{where}[{index}] must be a metric name or a pattern with * '
                                   f'(got {name!r})')
        _check_name(name, index, where, 'metric', 'NOT' if index == 0 else None)
        patterns.append(re.compile('.*'.join(re.escape(part) for part in name.split('*')) + r'\Z'))
    return patterns, exclude


def _check_dimensions(dimensions, where):
    if dimensions == 'ALL' or dimensions == ['*']:
        return None
    if isinstance(dimensions, str) or not isinstance(dimensions, (list, tuple)) or not dimensions:
        raise core.ConfigError(f"{where} must be a list of dimension names such as ['InstanceId'], "
                               "or 'ALL'")
    for index, name in enumerate(dimensions):
        if not isinstance(name, str) or not name.strip():
            raise core.ConfigError(f'{where}[{index}] must be a dimension name (got {name!r})')
        _check_name(name, index, where, 'dimension')
    if len(set(dimensions)) != len(dimensions):
        raise core.ConfigError(f'{where} names a dimension twice')
    return tuple(dimensions)


def _check_name(name, index, where, kind, keyword=None):
    """A metric's or dimension's name as CloudWatch matches it: exactly, so a
    space at either end, or 'ALL' written inside the list, would match
    nothing and the run would quietly collect nothing."""
    if name != name.strip():
        raise core.ConfigError(f'{where}[{index}] {name!r} has a space at its start or end: '
                               f'CloudWatch {kind} names match exactly; remove it')
    if name.upper() == 'ALL':
        raise core.ConfigError(f"{where}[{index}] {name!r} names no {kind}: for every {kind} write "
                               f"'ALL' (not in a list) or ['*']")
    if keyword and name.upper() == keyword:
        raise core.ConfigError(f"{where}[{index}] {name!r}: write {keyword!r} in capitals to "
                               f'exclude the {kind}s after it')


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------

def _by_namespace(targets):
    out = {}
    for target in targets:
        out.setdefault(target['namespace'], []).append(target)
    return out


def _matches(target, metric, dims):
    if target['include'] is not None:
        hit = any(p.match(metric) for p in target['include'])
        if hit == target['exclude']:
            return False
    if target['dimensions'] is not None and frozenset(n for n, _ in dims) != target['dimensions']:
        return False
    return True


def _fixed_dimensions(targets):
    """The dimension set every target of a namespace requires, if any."""
    sets = {t['dimensions'] for t in targets if t['dimensions'] is not None}
    return next(iter(sets)) if len(sets) == 1 else None


def _link_dimension(targets, namespace):
    """The dimension naming the object a series is about: the target's one
    dimension, or for a target of any dimensions the namespace's own (AWS/EC2:
    InstanceId), when a series has it."""
    default = DEFAULT_DIMENSIONS.get(namespace)
    for target in targets:
        if target['namespace'] != namespace:
            continue
        if target['link']:
            return target['link']
        if target['dimensions'] is None and default and len(default) == 1:
            return default[0]
    return None


def _epoch(stamp):
    return int(stamp.timestamp()) if hasattr(stamp, 'timestamp') else int(stamp)


def _new_result(region, member=None):
    result = {'region': region, 'series': 0, 'points': 0, 'queries': 0, 'api_calls': 0,
              'calls': {}, 'seconds': 0.0, 'error': None, 'hook_errors': 0, 'discovery': None,
              'buckets': set(), 'messages': set(), 'note': None}
    if member is not None:          # a member account of an Organization
        result.update(account=member.account_id, account_name=member.account_name)
    return result


def _summary(result):
    calls = ', '.join(f'{n} {op}' for op, n in sorted(result['calls'].items())) or 'no API call'
    text = (f"{result['series']} series, {result['points']} point(s) in "
            f"{result['buckets']} bucket(s); {calls} ({result['queries']} queries)")
    if result['discovery'] == 'cached':
        text += '; series from the cached ListMetrics answer'
    if result['note']:
        text += f"; {result['note']}"
    if result['messages']:
        text += '; CloudWatch said: ' + '; '.join(sorted(result['messages']))[:300]
    return text


def explain_error(error, action):
    if isinstance(error, ClientError):
        return auth.describe_client_error(error, action)
    if isinstance(error, auth.AuthError):
        return str(error)
    return f'{type(error).__name__}: {core.first_line(error)}'
