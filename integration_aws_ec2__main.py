"""EC2 inventory collector: every instance of every configured region, as
DataFlux custom objects (measurement `aws_ec2`).

Public entry points
    DataCollector(account, configs, filters=None, after_collect=None)
        The startup scripts' `main.DataCollector(account, collector_configs)`.
        The constructor validates and does no I/O; the Runner calls start(),
        identity(), collect() and reads `results` (cancel() if the account fails).
    instance_to_point(instance, region, extra_tags, timestamp) -> point dict
        The pure transform of one described instance.

collector_configs keys
    regions         list of region ids, e.g. ['cn-northwest-1']; ['*'] = every
                    region enabled for the account (ec2:DescribeRegions).
    concurrency     regions collected at once (default: all, at most 32).
    page_size       DescribeInstances MaxResults, 5..1000 (default 1000).
    retry_mode      botocore retry mode, 'adaptive' or 'standard'.
    max_attempts    attempts per request, the first included, 1..20, so throttling
                    (RequestLimitExceeded) is absorbed.
                    Without them: AWS_RETRY_MODE / AWS_MAX_ATTEMPTS (or retry_mode /
                    max_attempts in the AWS config file) when set, else 'adaptive'
                    and 8.

Output (compat.md section 4): tags name (= InstanceId), InstanceId, InstanceType,
PlatformDetails, RegionId, InstanceName, State, StateReason_Code, AvailabilityZone,
cloud_provider=AWS and the account's extra_tags; fields BlockDeviceMappings,
NetworkInterfaces, Placement, Tags (JSON text), LaunchTime, message (the whole
instance as JSON). UserData is never requested nor reported.

IAM permissions: ec2:DescribeInstances, ec2:DescribeRegions (only for ['*']),
sts:GetCallerIdentity (always allowed), plus what the account's method needs
(integration_aws_auth).
"""
import datetime
import gc
import json
import logging
import queue
import re
import threading
import time

from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    IncompleteReadError,
    ResponseStreamingError,
)
from botocore.parsers import ResponseParserError

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
        raise ImportError('integration_aws_ec2__main needs integration_aws_auth.py: paste it into '
                          'Func as the script set `integration_aws`, script `auth` (script id '
                          'integration_aws__auth), as the README says') from None

LOG = logging.getLogger('integration.aws.ec2')

MEASUREMENT = 'aws_ec2'
# What this collector calls: its clients know nothing else, which makes them
# several times cheaper to create (auth.AwsCollector.operations).
OPERATIONS = {'ec2': ['DescribeInstances']}
CONFIG_KEYS = ('regions', 'concurrency', 'page_size', 'retry_mode', 'max_attempts')
DEFAULTS = {'page_size': 1000}
# Used when neither collector_configs nor the user's SDK settings give them.
MAX_CONCURRENCY = 32
# Points an Organization's run makes while its accounts are still listed
# (identity()), before the Runner writes any: about 5 KB each.
EARLY_POINTS = 5000
GC_THRESHOLD = 50000
TRANSIENT_ERRORS = (ResponseParserError, IncompleteReadError, ResponseStreamingError)
PAGE_ATTEMPTS = 4
BUILT_IN_TAGS = ('name', 'InstanceId', 'InstanceType', 'PlatformDetails', 'RegionId',
                 'InstanceName', 'State', 'StateReason_Code', 'AvailabilityZone', 'cloud_provider')
# Extra hints for the region errors users meet most.
ERROR_HINTS = {
    'AuthFailure': 'is the region enabled for the account (opt-in regions answer AuthFailure '
                   'until enabled), and are the keys of this partition?',
    'OptInRequired': 'enable the region for the account, or remove it from regions',
    'UnauthorizedOperation': 'allow ec2:DescribeInstances in this region (see the README\'s policy)',
    'AccessDenied': 'allow ec2:DescribeInstances in this region (see the README\'s policy)',
    'RequestLimitExceeded': 'still throttled after retries: lower concurrency or raise max_attempts',
}


class DataCollector(auth.AwsCollector):
    """One account's EC2 instances in the configured regions (an
    Organization's: every member account's)."""

    title = 'AWS EC2'
    category = 'custom_object'
    min_interval = core.MIN_INTERVAL['custom_object']

    name = 'aws_ec2'
    built_in_tags = BUILT_IN_TAGS
    operations = OPERATIONS
    # Its instances' times are written as text: read as text (a third of the
    # CPU of making a point went into making datetimes and writing them back).
    text_timestamps = True

    def __init__(self, account, configs=None, filters=None, after_collect=None, *,
                 cache=None, clock=None):
        super().__init__(account, configs, filters, after_collect, cache=cache, clock=clock)
        self._run = None
        self.members_ready = None   # a Future: an Organization's accounts all listed (start)

    @staticmethod
    def validate_configs(configs):
        return validate_configs(configs)

    # -- what the Runner calls -------------------------------------------------

    def start(self):
        """Begin collecting in the background: the Runner calls this before
        identity(), so the identity call overlaps the regions' first pages."""
        if self._run is not None:
            return
        self.members_ready = None
        config = self._client_config()
        several = self.aws.organization or self.regions == ['*']
        # One pool for every (account, region) (an Organization's member roles
        # are assumed on another: see _members).
        # Of an Organization, an account's regions take at most half the pool
        # at once (a throttled account leaves the others room: Workers).
        size = self.configs.get('concurrency') or (
            MAX_CONCURRENCY if several else min(MAX_CONCURRENCY, len(self.regions)))
        pool = core.Workers(size, 'ec2', share=size // 2 if self.aws.organization else None)
        run = {
            'timestamp': time.time_ns(),
            'regions': [],
            'pages': queue.Queue(),
            # A parsed page of 1000 instances is tens of MB: at most one parsed
            # page per worker exists at a time, whatever the estate's size. A
            # worker waits only while its last page is turned into points, which
            # holds the GIL anyway.
            'slots': threading.Semaphore(pool.size),
            # Requests in flight, the member roles' AssumeRole (on the openers'
            # pool, see _members) included: at most `concurrency`.
            'inflight': threading.Semaphore(pool.size),
            'stop': self.new_cancellation(),
            'pool': pool,
            'gc': _relax_gc(),
            'clients': [],      # given back for the next run once this one is over
            'done': 0,          # regions ended
            'ended': set(),     # of them, by id (see _finish)
            'early': [],        # points made while identity() waits for the accounts
            'lock': threading.Lock(),   # ready() runs on the openers' threads
        }
        # From here on cancel() ends it all, however start() itself ends
        # (Func's timeout included, which no `except Exception` sees).
        self._run = run
        stop = run['stop']
        # Its network wait overlaps the making of the region clients below.
        self.aws.start_identity(stop, config)
        regions = self.aws.resolve_regions(config)
        self.results = run['regions']

        def ready(member):
            """Start the member's regions, as soon as it has a session."""
            organization = self.aws.organization
            # regions ['*'] over an Organization: the member's own enabled ones
            # (DescribeRegions, a request in flight like the others).
            mine = regions
            if mine is None:
                with core.held(run['inflight'], stop, 'this account was started'):
                    mine = self.aws.member_regions(member, regions, config)
            with run['lock']:
                for region in mine:
                    result = _new_result(region, member if organization else None)
                    # Clients come from the account's session (not thread-safe to
                    # create), each region starting as soon as its client exists.
                    client = stop.watch(auth.take_client(member.session, 'ec2', region, config))
                    run['regions'].append(result)
                    run['clients'].append(client)
                    pool.submit(self._fetch_region, client, result, run, group=member.account_id)

        if not self.aws.organization:
            ready(self.aws.members(stop, pool, self.aws.fresh)[0])
            return
        # An Organization's accounts are listed a page at a time: each page's
        # accounts start at once, while the next page is asked for. identity()
        # waits for the whole list (the Runner's account lines need it).
        self.members_ready = core.in_background(self._members, run, ready, regions,
                                                name='ec2-accounts-listing')

    def _members(self, run, ready, regions):
        # Member roles are assumed on a pool of their own: the regions' pool
        # may be full of regions waiting for the consumer, which waits for
        # the whole list of accounts.
        openers = run['openers'] = core.Workers(run['pool'].size, 'ec2-accounts')
        try:
            self.aws.members(run['stop'], openers, self.aws.fresh, ready=ready, bound=run['inflight'])
            # In the accounts' order, whatever order their roles were assumed in.
            order = {m.account_id: n for n, m in enumerate(self.aws.collected)}
            self.results.sort(key=lambda r: (order[r['account']], r['region'] if regions is None
                                             else regions.index(r['region'])))
        finally:
            # Its threads are done, or the run is failing: _finish waits for them.
            openers.stop(0)
            run['pages'].put(('listed', None, None))     # wakes identity()

    def identity(self):
        """The account in use; for an Organization, once every account is
        listed. Meanwhile the pages of the accounts already started are made
        into points (up to EARLY_POINTS), so that their regions go on."""
        run = self._run
        if run is not None and self.members_ready is not None:
            self.aws.identity()         # the management keys' failure first
            # The user's hooks run later, in collect(): their lines come after
            # the accounts'.
            made = 0
            while made < EARLY_POINTS:
                item = run['stop'].get(run['pages'])
                if item is None or item[0] == 'listed':     # None: stopped, not waited for
                    break
                page = self._page_points(run, item)
                if page is not None:
                    run['early'].append(page)
                    made += len(page[1])
        identity = super().identity()
        if self.members_ready is not None:
            self.members_ready.result()     # a failure to list the accounts is the account's
        return identity

    def _collect(self):
        """Yield points page by page, regions in parallel; fill self.results."""
        self.start()
        run, self._run = self._run, None
        try:
            if self.members_ready is not None:
                self.members_ready.result()     # every account's regions started
            early, run['early'] = run['early'], []
            for result, points in early:
                yield from self._hooked(points, result)
            early = None
            while run['done'] < len(run['regions']):
                item = run['stop'].get(run['pages'])
                if item is None:
                    # Stopped, and a region's thread is still asleep between
                    # botocore's retries: not waited for (_finish fails it).
                    return
                page = self._page_points(run, item)
                if page is not None:
                    yield from self._hooked(page[1], page[0])
                page = item = None
        finally:
            _finish(run)
        # Every region ended and no thread uses them: the next run's (not a
        # run the deadline cut short: its connections were shut).
        if run['stop'].reason is None:
            self.keep_clients(run['clients'])

    def _page_points(self, run, item):
        """(result, the points of a page) from the regions' queue, the user's
        hooks not applied yet; None for a region's or the listing's end."""
        kind, result, reservations = item
        if kind == 'done':
            run['done'] += 1
        if kind != 'page':
            return None
        # Points are a fraction of a parsed page's size: make them, free the
        # page (a parse leaves no cyclic garbage: freed at once) and let the
        # next page be fetched before the points are written.
        points = list(self._points(reservations, result, run['timestamp']))
        reservations = item = None
        run['slots'].release()
        return result, points

    def cancel(self):
        """Stop a started collection (the account failed as a whole)."""
        run, self._run = self._run, None
        if run is not None:
            _finish(run)
            self.results = []

    def check(self):
        """Probe each account's and region's permission with a 5-result
        DescribeInstances; an account whose role cannot be assumed is a row."""
        def probe(client, region):
            resp = client.describe_instances(MaxResults=5)
            count = sum(len(r['Instances']) for r in resp['Reservations'])
            return f'ec2:DescribeInstances allowed ({count} instance(s) on a 5-result page)'
        return auth.check_accounts(self.aws, self._client_config(), 'ec2', probe, explain_error)

    # -- collection ----------------------------------------------------------

    def _fetch_region(self, client, result, run):
        """Worker: one region's pages, in order, onto the queue."""
        started = time.monotonic()
        params = {'MaxResults': self.configs['page_size']}
        pages, stop = run['pages'], run['stop']
        try:
            while _acquire(run['slots'], stop):
                fetched = False
                try:
                    resp = self._describe_page(client, params, result, run)
                    fetched = True
                finally:
                    if not fetched:
                        run['slots'].release()
                result['api_calls'] += 1 + resp['ResponseMetadata'].get('RetryAttempts', 0)
                result['pages'] += 1
                params['NextToken'] = resp.get('NextToken')
                pages.put(('page', result, resp['Reservations']))
                resp = None     # the consumer holds the page now; don't keep it alive
                if not params['NextToken']:
                    break
            else:               # the run ended before the region's last page
                result['error'] = _stopped(run)
        except (ClientError, BotoCoreError, auth.AuthError) as e:
            if isinstance(e, ClientError):
                result['api_calls'] += 1 + e.response.get('ResponseMetadata', {}).get('RetryAttempts', 0)
                auth.note_refusal(result, e)
            # A connection the run's end shut down: said as such.
            result['error'] = (_stopped(run) if stop.is_set() and not isinstance(e, ClientError)
                               else explain_error(e, result['region']))
        except Exception as e:  # a bug must still be reported, not lost in a thread
            result['error'] = _stopped(run) if stop.is_set() else explain_error(e, result['region'])
        finally:
            result['seconds'] = round(time.monotonic() - started, 3)
            run['ended'].add(id(result))
            pages.put(('done', result, None))

    def _describe_page(self, client, params, result, run):
        """One DescribeInstances page. botocore retries throttling and broken
        connections itself; an answer cut short in transit (invalid XML, an
        incomplete read) it does not, so ask again for the same page."""
        stop = run['stop']
        for attempt in range(1, PAGE_ATTEMPTS + 1):
            with core.held(run['inflight'], stop, 'this page was asked for'):
                try:
                    return client.describe_instances(**params)
                except TRANSIENT_ERRORS as e:
                    result['api_calls'] += 1
                    if attempt == PAGE_ATTEMPTS or stop.is_set():
                        raise
                    LOG.warning('[%s] page %d: %s; asking again', result['region'],
                                result['pages'] + 1, core.first_line(e))
            time.sleep(0.2 * 2 ** attempt)

    def _points(self, reservations, result, timestamp):
        tags = self.extra_tags
        if result.get('account'):
            tags = dict(tags, AccountId=result['account'])
            if result.get('account_name'):
                tags['AccountName'] = result['account_name']
        for reservation in reservations:
            for instance in reservation.get('Instances', []):
                yield instance_to_point(instance, result['region'], tags, timestamp)

    def _hooked(self, points, result):
        """The points the user's hooks (filters, after_collect) keep, counted."""
        hooked = bool(self.filters) or self.after_collect is not None
        for point in points:
            if hooked:
                point = self._apply_hooks(point, result)
                if point is None:
                    continue
            result['instances'] += 1
            yield point

    def _apply_hooks(self, point, result):
        return core.apply_hooks(point, self.filters, self.after_collect, result,
                                f"instance {point['tags']['name']}")


# --------------------------------------------------------------------------
# The transform: one instance -> one point (pure)
# --------------------------------------------------------------------------

def instance_to_point(instance, region, extra_tags, timestamp):
    if 'UserData' in instance:      # never asked for; never written
        instance = {k: v for k, v in instance.items() if k != 'UserData'}
    instance_id = instance['InstanceId']
    aws_tags = instance.get('Tags') or []
    name_tag = next((t.get('Value') for t in aws_tags if t.get('Key') == 'Name'), None)
    tags = {
        'name': instance_id,
        'InstanceId': instance_id,
        'InstanceType': instance.get('InstanceType'),
        'PlatformDetails': instance.get('PlatformDetails'),
        'RegionId': region,
        'InstanceName': name_tag,
        'State': (instance.get('State') or {}).get('Name'),
        'StateReason_Code': (instance.get('StateReason') or {}).get('Code'),
        'AvailabilityZone': (instance.get('Placement') or {}).get('AvailabilityZone'),
        'cloud_provider': 'AWS',
    }
    tags.update(extra_tags)
    tags = core.clean_tags(tags)
    encode = _encoder()
    fields = {key: encode(instance[key]) if instance.get(key) else empty
              for key, empty in JSON_FIELDS.items()}
    launch_time = instance.get('LaunchTime')
    if launch_time:
        fields['LaunchTime'] = auth.iso_time(launch_time)
    fields['message'] = _message(instance, fields, encode)
    return {'measurement': MEASUREMENT, 'tags': tags, 'fields': fields, 'timestamp': timestamp}


# The fields that are a part of the instance as JSON text, with their text
# when the instance has none.
JSON_FIELDS = {'BlockDeviceMappings': '[]', 'NetworkInterfaces': '[]', 'Placement': '{}', 'Tags': '[]'}
# What holds a field's place in `message` until its text goes in: a NUL, which
# no instance from AWS has (XML 1.0 cannot carry one).
_PLACE = {key: '\x00' + key for key in JSON_FIELDS}
_PLACED = re.compile(r'"\\u0000(BlockDeviceMappings|NetworkInterfaces|Placement|Tags)"')


def _message(instance, fields, encode):
    """The instance as JSON. Its largest parts are the fields' text already
    (half of its encoding): put in, not encoded again."""
    placed = dict(instance)
    used = [key for key in JSON_FIELDS if instance.get(key)]
    for key in used:
        placed[key] = _PLACE[key]
    text = encode(placed)
    if text.count('\\u0000') != len(used):
        return encode(instance)     # a NUL of the caller's own: encoded as it is
    # One pass: a field's text, once in, is not searched again.
    return _PLACED.sub(lambda place: fields[place.group(1)], text)


def _encoder():
    """One JSON encoder per execution of this module (Func runs it again in
    every task), not one per call."""
    encode = _JSON.get('encode')
    if encode is None:
        encode = _JSON['encode'] = _make_encoder()
    return encode


_JSON = {}


def _make_encoder():
    """json.JSONEncoder's encode(), minus the C encoder it makes anew at every
    call (a fifth of encoding an instance's small parts): that C encoder made
    once, where the json module has one (CPython's, 3.8 and later)."""
    encoder = json.JSONEncoder(ensure_ascii=False, separators=(',', ':'), default=_json_default)
    make = getattr(json.encoder, 'c_make_encoder', None)
    if make is None:
        return encoder.encode
    try:
        # (markers, default, encoder, indent, key_separator, item_separator,
        #  sort_keys, skipkeys, allow_nan), as JSONEncoder.iterencode passes
        # them; markers None: parsed responses have no cycles (a cyclic
        # value is a RecursionError here, json's ValueError otherwise).
        chunks = make(None, _json_default, json.encoder.encode_basestring, None, ':', ',',
                      False, False, True)
    except TypeError:
        return encoder.encode
    join = ''.join
    return lambda value: join(chunks(value, 0))


def _json_default(value):
    if isinstance(value, datetime.datetime):
        return auth.iso_time(value)
    if isinstance(value, (datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.decode('utf-8', 'replace')
    return str(value)


# --------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------

def validate_configs(configs):
    where = 'collector_configs'
    if not isinstance(configs, dict):
        raise core.ConfigError(f"{where} must be a dict such as {{'regions': ['cn-northwest-1']}}, "
                               f'not {type(configs).__name__}')
    core.check_keys(configs, CONFIG_KEYS, where, elsewhere=(auth.KNOWN_KEYS, 'account'))
    out = dict(DEFAULTS)
    out.update(configs)
    out['regions'] = auth.check_regions(configs.get('regions'), f"{where}['regions']")
    core.check_int(out, 'page_size', 5, 1000, where)
    auth.check_retry_options(out, where)
    if out.get('concurrency') is not None:
        core.check_int(out, 'concurrency', 1, MAX_CONCURRENCY, where)
    return out


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------

def explain_error(error, region):
    """One line for a region's failure: what AWS said and what to do."""
    if isinstance(error, ClientError):
        code = error.response.get('Error', {}).get('Code', '')
        line = auth.describe_client_error(error, 'ec2:DescribeInstances')
        hint = ERROR_HINTS.get(code)
        return f'{line} ({hint})' if hint else line
    if isinstance(error, auth.AuthError):
        return str(error)
    return f'{type(error).__name__}: {core.first_line(error)}'


def _new_result(region, member=None):
    result = {'region': region, 'instances': 0, 'pages': 0, 'api_calls': 0,
              'seconds': 0.0, 'error': None, 'hook_errors': 0}
    if member is not None:          # a member account of an Organization
        result.update(account=member.account_id, account_name=member.account_name)
    return result


def _finish(run):
    """End a collection, however it ended: no thread goes on calling AWS."""
    run['stop'].cancel()
    # Regions not yet started find the stop set and end at once.
    run['pool'].stop(core.STOP_GRACE)
    if run.get('openers') is not None:
        run['openers'].stop(core.STOP_GRACE)
    gc.set_threshold(*run['gc'])
    # A region the run ended before (never started, or still running after
    # the grace) is not a region read, nor one with nothing in it.
    with run['lock']:
        for result in run['regions']:
            if id(result) not in run['ended'] and not result['error']:
                result['error'] = _stopped(run)


def _stopped(run):
    """A region's error when the run ended before it finished."""
    return run['stop'].why('this region was collected')


def _acquire(slots, stop):
    """Wait for a page slot; False once the consumer went away."""
    while not stop.is_set():
        if slots.acquire(timeout=0.5):
            return True
    return False


def _relax_gc():
    """Parsing a page allocates about a million objects; with CPython's default
    threshold the cyclic GC then rescans the whole heap many times per page
    (25-45% of the CPU in a long-lived worker, measured in bench/). Raise the
    threshold while collecting; _finish puts the old one back."""
    previous = gc.get_threshold()
    gc.set_threshold(max(previous[0], GC_THRESHOLD), *previous[1:])
    return previous
