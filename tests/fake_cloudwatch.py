"""A fake Amazon CloudWatch endpoint on loopback, for tests and benchmarks of a
metrics collector that uses boto3's `cloudwatch` client.

moto serves CloudWatch values but enforces neither the 500-query limit of
GetMetricData nor its NextToken pagination, and never throttles. This fake does
all three, so a test FAILS when a call carries 501 queries, a page is dropped or
a NextToken is reused with another request.

Public entry points:
    FakeCloudWatch(estate, ...)   the server (.start(), .stop(), .url, .client())
    ec2_estate(...)               an estate of EC2 series with the default metrics
    write_cloudwatch_model(...)   a model dir making botocore speak one protocol
    self_check()                  `python tests/fake_cloudwatch.py`: a smoke test
                                  with the installed botocore, no pytest needed
    expected_value(...)           the value the fake serves for a series and bucket
    EC2_METRICS, STATISTICS       the conf's default EC2 metric names; the 5 stats

Protocols, recognised per request (one server serves all three):
    json                  `X-Amz-Target: GraniteServiceVersion20100801.<Op>`,
                          JSON bodies. What botocore 1.44 actually sends: its
                          protocol priority puts 'json' before
                          'smithy-rpc-v2-cbor' in the model's `protocols` list.
    smithy-rpc-v2-cbor    `POST /service/GraniteServiceVersion20100801/operation/<Op>`,
                          CBOR bodies, decoded and encoded with botocore's own
                          CBOR parser and serializer.
    query                 form-encoded `Action=<Op>&...`, XML answers: what
                          botocore 1.37 (Func's worker) sends.
Errors carry `x-amzn-query-error: <Code>;Sender` in the json and CBOR protocols
(CloudWatch is `awsQueryCompatible`), so botocore reports the same error codes
(`ValidationError`, `Throttling`, `InvalidNextToken` ...) in all three.

The region of a request is the one in its SigV4 credential scope; signatures are
not checked. Values are deterministic (`expected_value`); buckets are aligned to
the period on the clock; the fake's "now" is injectable (`clock=`, `fake.now =`).
"""
import base64
import datetime
import hashlib
import http.server
import json
import re
import threading
import time
import urllib.parse
import uuid
import zlib
from xml.sax.saxutils import escape as _xml_escape

import botocore.session
from botocore.parsers import RpcV2CBORParser
from botocore.serialize import RpcV2CBORSerializer

EC2_METRICS = (
    'CPUUtilization', 'DiskReadOps', 'DiskWriteOps', 'DiskReadBytes', 'DiskWriteBytes',
    'MetadataNoToken', 'NetworkIn', 'NetworkOut', 'NetworkPacketsIn', 'NetworkPacketsOut',
    'CPUCreditUsage', 'CPUCreditBalance', 'CPUSurplusCreditBalance',
    'CPUSurplusCreditsCharged', 'StatusCheckFailed', 'StatusCheckFailed_Instance',
    'StatusCheckFailed_System',
)
EC2_UNITS = {
    'CPUUtilization': 'Percent', 'DiskReadBytes': 'Bytes', 'DiskWriteBytes': 'Bytes',
    'NetworkIn': 'Bytes', 'NetworkOut': 'Bytes',
}
STATISTICS = ('Average', 'Maximum', 'Minimum', 'SampleCount', 'Sum')

MAX_QUERIES = 500           # GetMetricData, fixed by AWS
AWS_PAGE_DATAPOINTS = 100800
LIST_PAGE = 500             # ListMetrics results a page
GMS_MAX_DATAPOINTS = 1440   # GetMetricStatistics
QUERY_ID_RE = re.compile(r'^[a-z][a-zA-Z0-9_]*$')
SCAN_BY = ('TimestampDescending', 'TimestampAscending')

XML_NS = 'http://monitoring.amazonaws.com/doc/2010-08-01/'
_CBOR_PATH_RE = re.compile(r'^/service/([^/]+)/operation/([^/?]+)')
_SCOPE_RE = re.compile(r'Credential=[^/]+/\d+/([^/]+)/([^/]+)/')
# `__type` names the error's shape, as AWS's json and CBOR answers do; botocore
# takes the code (on the left) from the x-amzn-query-error header.
_ERROR_SHAPES = {
    'InvalidParameterValue': 'InvalidParameterValueException',
    'InvalidParameterCombination': 'InvalidParameterCombinationException',
    'MissingParameter': 'MissingRequiredParameterException',
    'InternalServiceError': 'InternalServiceFault',
}
_REASONS = {200: 'OK', 400: 'Bad Request', 404: 'Not Found', 500: 'Internal Server Error'}


class FakeCloudWatchError(Exception):
    """An error the fake answers with: AWS code, message, HTTP status. A
    `violation` is a request real AWS would refuse because the client broke a
    documented limit: it is also recorded in `fake.violations`."""

    def __init__(self, code, message, status=400, violation=False):
        super().__init__(message)
        self.code, self.message, self.status, self.violation = code, message, status, violation


class FakeCloudWatch:
    """A threaded CloudWatch endpoint on 127.0.0.1 (a free port).

    estate           {region: [series, ...]}, or a list of series served in every
                     region. A series is a dict: 'namespace', 'metric',
                     'dimensions' ({name: value}), optional 'unit' (default
                     'Count'), 'resolution' (default `period`), 'missing'
                     (bucket start times without data), 'late' ({bucket start:
                     time its data appears}), 'active' (False: left out of
                     RecentlyActive=PT3H listings). Times: epoch seconds or
                     aware datetimes.
    period           seconds between a series' raw datapoints unless the series
                     says otherwise ('resolution'): 300 is EC2 basic monitoring,
                     60 detailed. A query with a shorter Period gets only the
                     buckets holding a raw datapoint (basic monitoring at 60 s: one
                     point every 5 minutes), as AWS answers.
    latency          seconds added to every answer (threads overlap them).
    page_datapoints  GetMetricData datapoints a page before NextToken (AWS: 100,800);
                     a request's MaxDatapoints lowers it.
    list_page        ListMetrics results a page (AWS: 500).
    paging           'series': a page holds queries in request order, the one cut
                     in two is PartialData; 'time': datapoints of all queries by
                     time (ScanBy order), every query cut is PartialData.
    throttle_every   answer every Nth request (all operations) with HTTP 400
                     Throttling "Rate exceeded"; 0: never.
    clock            callable giving "now" in epoch seconds (default time.time);
                     `fake.now = t` freezes it at t (epoch or aware datetime).
    delay            seconds after a bucket's END (its last raw datapoint's end)
                     before its data appears (AWS EC2 basic metrics: 300-600). The
                     bucket being filled is never served.
    values           callable (series, stat, bucket_start, period) -> float or None
                     (None: no data in that bucket); default `expected_value`.
    late             callable (series, bucket_start, period) -> epoch seconds from
                     which that bucket is served, or None for the default rule.

    Recorder: `calls` (one dict per request: operation, region, protocol, queries,
    next_token_in, next_token_out, datapoints_out, metrics_out, status (HTTP),
    error (AWS code or None), time (wall clock at arrival)), `throttled` (count),
    `violations` (strings), `unfollowed_tokens()` (NextTokens handed out and never
    presented: dropped pages), `assert_clean()`, `reset()`. `series(region)`:
    the series dicts served there.
    """

    def __init__(self, estate, period=300, latency=0.0, page_datapoints=AWS_PAGE_DATAPOINTS,
                 list_page=LIST_PAGE, paging='series', throttle_every=0, clock=None, delay=0,
                 values=None, late=None, default_region='us-east-1'):
        if paging not in ('series', 'time'):
            raise ValueError(f"paging must be 'series' or 'time', not {paging!r}")
        if page_datapoints < 1 or list_page < 1:
            raise ValueError('page_datapoints and list_page must be at least 1')
        self.period = period
        self.latency = latency
        self.page_datapoints = page_datapoints
        self.list_page = list_page
        self.paging = paging
        self.throttle_every = throttle_every
        self.clock = clock or time.time
        self.delay = delay
        self.values = values
        self.late = late
        self.default_region = default_region
        if isinstance(estate, dict):
            self._regions = {region: _Estate(series, period) for region, series in estate.items()}
            self._everywhere = None
        else:
            self._regions = {}
            self._everywhere = _Estate(estate, period)
        self._empty = _Estate([], period)
        self._model = botocore.session.Session().get_service_model('cloudwatch')
        self._ops = {name: self._model.operation_model(name)
                     for name in ('ListMetrics', 'GetMetricData', 'GetMetricStatistics')}
        self._handlers = {'ListMetrics': self._list_metrics, 'GetMetricData': self._get_metric_data,
                          'GetMetricStatistics': self._get_metric_statistics}
        self._cbor_in = RpcV2CBORParser()
        self._cbor_out = _CBORWriter()
        self._lock = threading.Lock()
        self.httpd = None
        self.url = None
        self.reset()

    # -- lifecycle -------------------------------------------------------

    def start(self):
        fake = self

        class Handler(_Handler):
            pass
        Handler.fake = fake
        self.httpd = _Server(('127.0.0.1', 0), Handler)
        self.url = f'http://127.0.0.1:{self.httpd.server_address[1]}'
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), name='fake-cloudwatch',
                         daemon=True).start()
        return self

    def stop(self):
        if self.httpd is not None:
            self.httpd.shutdown()
            self.httpd.server_close()
            self.httpd = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def client(self, region='us-east-1', protocol=None, model_dir=None, **config):
        """A boto3 cloudwatch client pointed at the fake, with fake keys.
        `protocol` ('json', 'smithy-rpc-v2-cbor' or 'query') forces the wire
        protocol through a copy of the service model written to `model_dir`
        (a fresh temporary directory by default); `config` goes to botocore's
        Config (e.g. retries={'mode': 'standard'})."""
        import boto3
        from botocore.config import Config
        session = botocore.session.Session()
        if protocol is not None:
            if model_dir is None:
                import tempfile
                model_dir = tempfile.mkdtemp(prefix='fake-cloudwatch-model-')
            session.set_config_variable('data_path', write_cloudwatch_model(model_dir, protocol))
        return boto3.session.Session(botocore_session=session).client(
            'cloudwatch', region_name=region, endpoint_url=self.url,
            aws_access_key_id='AKIAEXAMPLEFAKECW0001', aws_secret_access_key='fake-secret',
            config=Config(**config) if config else None)

    # -- clock -----------------------------------------------------------

    @property
    def now(self):
        return self.clock()

    @now.setter
    def now(self, value):
        frozen = _epoch(value)
        self.clock = lambda: frozen

    # -- recorder --------------------------------------------------------

    def reset(self):
        with self._lock:
            self.calls = []
            self.violations = []
            self._requests = 0
            self._issued_tokens = {}

    @property
    def throttled(self):
        return sum(1 for call in self.calls if call['error'] == 'Throttling')

    def unfollowed_tokens(self):
        """(operation, token) of every NextToken handed out and never presented."""
        with self._lock:
            return [(op, token) for token, op in self._issued_tokens.items()]

    def assert_clean(self):
        """Fail when a limit was broken or a page was never fetched."""
        problems = list(self.violations) + [
            f'{op}: page never fetched (NextToken handed out and not used)'
            for op, _ in self.unfollowed_tokens()]
        assert not problems, 'fake CloudWatch saw:\n  ' + '\n  '.join(problems)

    def series(self, region):
        """The series dicts served in a region (for tests computing expectations)."""
        return [s.source for s in self._estate(region).series]

    # -- request handling --------------------------------------------------

    def _estate(self, region):
        if self._everywhere is not None:
            return self._everywhere
        return self._regions.get(region, self._empty)

    def _handle(self, path, headers, body):
        """(status, headers, body) for one HTTP request."""
        arrived = time.time()
        scope = _SCOPE_RE.search(headers.get('Authorization', ''))
        region = scope.group(1) if scope else self.default_region
        call = {'operation': None, 'region': region, 'protocol': None, 'queries': 0,
                'next_token_in': False, 'next_token_out': False, 'datapoints_out': 0,
                'metrics_out': 0, 'status': 200, 'error': None, 'time': arrived}
        protocol = _protocol_of(path, headers)
        try:
            operation, params = self._decode(protocol, path, headers, body)
            call['protocol'], call['operation'] = protocol, operation
            call['next_token_in'] = bool(params.get('NextToken'))
            with self._lock:
                self._requests += 1
                throttle = self.throttle_every and self._requests % self.throttle_every == 0
            if throttle:
                raise FakeCloudWatchError('Throttling', 'Rate exceeded')
            handler = self._handlers.get(operation)
            if handler is None:
                raise FakeCloudWatchError(
                    'InvalidAction', f'fake CloudWatch does not implement {operation}')
            try:
                result = handler(params, region, call)
                payload, content_type = self._encode(protocol, operation, result)
            except FakeCloudWatchError:
                raise
            except Exception as exc:    # a request the fake cannot read, or a bug in it
                raise FakeCloudWatchError('InternalServiceError', f'fake CloudWatch failed: {exc!r}',
                                          500, violation=True) from exc
            status, extra = 200, {}
        except FakeCloudWatchError as error:
            call['status'], call['error'] = error.status, error.code
            if error.violation:
                with self._lock:
                    self.violations.append(f'{call["operation"]}: {error.message}')
            payload, content_type, extra = self._encode_error(protocol, error)
            status = error.status
        if self.latency:
            time.sleep(self.latency)
        with self._lock:
            self.calls.append(call)
        reply = {'Content-Type': content_type, 'x-amzn-RequestId': str(uuid.uuid4())}
        if protocol == 'smithy-rpc-v2-cbor':
            reply['smithy-protocol'] = 'rpc-v2-cbor'
        reply.update(extra)
        return status, reply, payload

    def _decode(self, protocol, path, headers, body):
        """(operation, params) of a request, timestamps left as sent."""
        try:
            if protocol == 'smithy-rpc-v2-cbor':
                match = _CBOR_PATH_RE.match(path)
                if not match:
                    raise FakeCloudWatchError('UnknownOperationException', f'bad CBOR path {path}')
                params = self._cbor_in.parse_data_item(
                    self._cbor_in.get_peekable_stream_from_bytes(body)) if body else {}
                return match.group(2), params
            if protocol == 'json':
                return headers['X-Amz-Target'].rsplit('.', 1)[-1], json.loads(body or b'{}')
            return self._decode_query(body)
        except FakeCloudWatchError:
            raise
        except Exception as exc:
            raise FakeCloudWatchError('SerializationException',
                                      f'fake CloudWatch cannot read the request: {exc!r}') from exc

    def _decode_query(self, body):
        if isinstance(body, bytes):
            body = body.decode('utf-8')
        pairs = urllib.parse.parse_qsl(body, keep_blank_values=True)
        form = dict(pairs)
        operation = form.pop('Action', None)
        if operation is None:
            raise FakeCloudWatchError('MissingAction', 'no Action in a query request', 400)
        form.pop('Version', None)
        op = self._ops.get(operation)
        return operation, (_from_query(form, op.input_shape) if op is not None else {})

    def _encode(self, protocol, operation, result):
        shape = self._ops[operation].output_shape
        if protocol == 'json':
            return json.dumps(result, separators=(',', ':')).encode(), 'application/x-amz-json-1.0'
        if protocol == 'smithy-rpc-v2-cbor':
            out = bytearray()
            self._cbor_out._serialize_data_item(out, result, shape)
            return bytes(out), 'application/cbor'
        parts = [f'<{operation}Response xmlns="{XML_NS}"><{operation}Result>']
        for name, value in result.items():
            _to_xml(shape.members[name], value, name, parts)
        parts.append(f'</{operation}Result><ResponseMetadata><RequestId>{uuid.uuid4()}'
                     f'</RequestId></ResponseMetadata></{operation}Response>')
        return ''.join(parts).encode(), 'text/xml'

    def _encode_error(self, protocol, error):
        if protocol == 'query':
            body = (f'<ErrorResponse xmlns="{XML_NS}"><Error><Type>Sender</Type>'
                    f'<Code>{error.code}</Code><Message>{_xml_escape(error.message)}</Message>'
                    f'</Error><RequestId>{uuid.uuid4()}</RequestId></ErrorResponse>')
            return body.encode(), 'text/xml', {}
        fault = 'Receiver' if error.status >= 500 else 'Sender'
        extra = {'x-amzn-query-error': f'{error.code};{fault}'}
        document = {'__type': 'com.amazonaws.cloudwatch#' + _ERROR_SHAPES.get(error.code, error.code),
                    'message': error.message}
        if protocol == 'json':
            return json.dumps(document).encode(), 'application/x-amz-json-1.0', extra
        out = bytearray(b'\xa2')        # a CBOR map of two text strings
        for key, value in document.items():
            self._cbor_out._serialize_type_string(out, key, None, None)
            self._cbor_out._serialize_type_string(out, value, None, None)
        return bytes(out), 'application/cbor', extra

    # -- operations --------------------------------------------------------

    def _list_metrics(self, params, region, call):
        recently = params.get('RecentlyActive')
        if recently is not None and recently != 'PT3H':
            raise FakeCloudWatchError(
                'ValidationError',
                f"1 validation error detected: Value '{recently}' at 'recentlyActive' failed to "
                "satisfy constraint: Member must satisfy enum value set: [PT3H]", violation=True)
        namespace, metric = params.get('Namespace'), params.get('MetricName')
        wanted = [(d.get('Name'), d.get('Value')) for d in params.get('Dimensions') or []]
        fingerprint = _Fingerprint(['ListMetrics', namespace, metric, wanted, recently])
        offset, _ = self._take_token('ListMetrics', params.get('NextToken'), fingerprint)
        matches = [
            s for s in self._estate(region).series
            if (namespace is None or s.namespace == namespace)
            and (metric is None or s.metric == metric)
            and (recently is None or s.active)
            # A name-only filter matches series that have that dimension among others.
            and all(name in s.dimensions and (value is None or s.dimensions[name] == value)
                    for name, value in wanted)]
        page = matches[offset:offset + self.list_page]
        result = {'Metrics': [s.listing for s in page]}
        if offset + self.list_page < len(matches):
            result['NextToken'] = self._issue_token(
                'ListMetrics', fingerprint, offset + self.list_page, None)
            call['next_token_out'] = True
        call['metrics_out'] = len(page)
        return result

    def _get_metric_data(self, params, region, call):
        queries = params.get('MetricDataQueries') or []
        call['queries'] = len(queries)
        if len(queries) > MAX_QUERIES:
            raise FakeCloudWatchError(
                'ValidationError',
                f'The collection MetricDataQueries must not have a size greater than {MAX_QUERIES}.',
                violation=True)
        if not queries:
            raise FakeCloudWatchError(
                'ValidationError', 'The collection MetricDataQueries must not be empty.',
                violation=True)
        start, end = _window(params)
        scan = params.get('ScanBy') or 'TimestampDescending'
        if scan not in SCAN_BY:
            raise FakeCloudWatchError(
                'ValidationError', f'The parameter ScanBy must be one of {", ".join(SCAN_BY)}.',
                violation=True)
        estate = self._estate(region)
        wanted, seen = [], set()
        for n, query in enumerate(queries, 1):
            where = f'MetricDataQueries.member.{n}'
            query_id = query.get('Id') or ''
            if not QUERY_ID_RE.match(query_id):
                raise FakeCloudWatchError(
                    'ValidationError',
                    f"The value {query_id!r} for parameter {where}.Id is not valid: it must start "
                    "with a lowercase letter and hold only letters, digits and '_'.",
                    violation=True)
            if query_id in seen:
                raise FakeCloudWatchError(
                    'ValidationError',
                    f'The values for parameter id in MetricDataQueries are not unique '
                    f'({query_id!r} again at {where}).', violation=True)
            seen.add(query_id)
            stat_spec = query.get('MetricStat')
            if query.get('Expression') is not None or stat_spec is None:
                raise FakeCloudWatchError(
                    'ValidationError', f'fake CloudWatch serves only MetricStat queries ({where}).',
                    violation=True)
            period = _period(stat_spec.get('Period'), f'{where}.MetricStat.Period')
            stat = stat_spec.get('Stat')
            _check_stat(stat, f'{where}.MetricStat.Stat')
            metric = stat_spec.get('Metric') or {}
            if query.get('ReturnData', True) in (False, 'false'):
                continue
            series = estate.find(metric.get('Namespace'), metric.get('MetricName'),
                                 metric.get('Dimensions'))
            label = query.get('Label') or metric.get('MetricName') or query_id
            wanted.append((query_id, label, series, stat, period))
        max_points = params.get('MaxDatapoints')
        limit = min(self.page_datapoints, int(max_points)) if max_points else self.page_datapoints
        # Computed only when a NextToken is presented or handed out.
        fingerprint = _Fingerprint(['GetMetricData', queries, start, end, scan, max_points])
        offset, snapshot = self._take_token('GetMetricData', params.get('NextToken'), fingerprint)
        now = self.clock() if snapshot is None else snapshot
        descending = scan == 'TimestampDescending'
        points = [self._points(series, stat, period, start, end, now, descending)
                  if series is not None else [] for _, _, series, stat, period in wanted]
        if self.paging == 'series':
            results, next_offset = _page_by_series(wanted, points, offset, limit)
        else:
            results, next_offset = _page_by_time(wanted, points, offset, limit, descending)
        result = {'MetricDataResults': results}
        if next_offset is not None:
            result['NextToken'] = self._issue_token('GetMetricData', fingerprint, next_offset, now)
            call['next_token_out'] = True
        call['datapoints_out'] = sum(len(r['Timestamps']) for r in results)
        return result

    def _get_metric_statistics(self, params, region, call):
        call['queries'] = 1
        start, end = _window(params)
        period = _period(params.get('Period'), 'Period')
        if params.get('ExtendedStatistics'):
            raise FakeCloudWatchError(
                'ValidationError', 'fake CloudWatch does not serve ExtendedStatistics.',
                violation=True)
        statistics = params.get('Statistics') or []
        if not statistics:
            raise FakeCloudWatchError(
                'MissingParameter', 'Must specify either Statistics or ExtendedStatistics.',
                violation=True)
        for n, stat in enumerate(statistics, 1):
            _check_stat(stat, f'Statistics.member.{n}')
        first = _first_bucket(start, period)
        requested = max(0, -(-(end - first) // period))
        if requested > GMS_MAX_DATAPOINTS:
            raise FakeCloudWatchError(
                'InvalidParameterCombination',
                f'You have requested up to {requested:,} datapoints, which exceeds the limit of '
                f'{GMS_MAX_DATAPOINTS:,}. You may reduce the datapoints requested by increasing '
                'Period, or decreasing the time range.', violation=True)
        series = self._estate(region).find(
            params.get('Namespace'), params.get('MetricName'), params.get('Dimensions'))
        datapoints = []
        unit = params.get('Unit')
        if series is not None and (unit is None or unit == series.unit):
            now = self.clock()
            by_stat = {stat: dict(self._points(series, stat, period, start, end, now, False))
                       for stat in statistics}
            for timestamp in by_stat[statistics[0]]:
                point = {'Timestamp': timestamp}
                for stat in statistics:
                    if timestamp in by_stat[stat]:
                        point[stat] = by_stat[stat][timestamp]
                point['Unit'] = series.unit
                datapoints.append(point)
            # AWS returns them unordered: a deterministic shuffle keeps tests honest.
            datapoints.sort(key=lambda p: (p['Timestamp'] * 2654435761) % 4294967291)
        call['datapoints_out'] = len(datapoints)
        return {'Label': params.get('MetricName') or '', 'Datapoints': datapoints}

    # -- data --------------------------------------------------------------

    def _points(self, series, stat, period, start, end, now, descending):
        """[(bucket start, value)] served for one series and statistic."""
        first = _first_bucket(start, period)
        values, late, delay = self.values, self.late, self.delay
        resolution = series.resolution
        out = []
        for bucket in range(first, end, period):
            count, last_raw = _raw_points(bucket, period, resolution)
            if not count or bucket in series.missing:
                continue
            visible_from = series.late.get(bucket)
            if visible_from is None and late is not None:
                visible_from = late(series.source, bucket, period)
            if visible_from is None:
                visible_from = last_raw + resolution + delay
            if now < visible_from:
                continue
            if values is None:
                value = _stat_value(series.base, stat, bucket, count)
            else:
                value = values(series.source, stat, bucket, period)
                if value is None:
                    continue
            out.append((bucket, value))
        if descending:
            out.reverse()
        return out

    # -- NextToken -----------------------------------------------------------

    def _issue_token(self, operation, fingerprint, offset, snapshot):
        raw = json.dumps([fingerprint.digest, offset, snapshot]).encode()
        token = base64.urlsafe_b64encode(raw).decode()
        with self._lock:
            self._issued_tokens[token] = operation
        return token

    def _take_token(self, operation, token, fingerprint):
        """(offset, clock snapshot) a NextToken stands for; (0, None) without one."""
        if not token:
            return 0, None
        try:
            issued_for, offset, snapshot = json.loads(base64.urlsafe_b64decode(token.encode()))
        except (ValueError, TypeError):
            raise FakeCloudWatchError('InvalidNextToken', 'The NextToken is not valid.',
                                      violation=True)
        if issued_for != fingerprint.digest:
            raise FakeCloudWatchError(
                'InvalidNextToken',
                'The NextToken was issued for a different request: a NextToken must be used '
                'with the same parameters as the request that returned it.', violation=True)
        with self._lock:
            self._issued_tokens.pop(token, None)
        return offset, snapshot


# -- estate ------------------------------------------------------------------

def ec2_estate(instances=1000, metrics=14, region='us-east-1'):
    """{region: series} for `instances` EC2 instances with the first `metrics`
    default EC2 metric names, each with one InstanceId dimension. Instance ids
    differ between regions."""
    if not 0 < metrics <= len(EC2_METRICS):
        raise ValueError(f'metrics must be 1..{len(EC2_METRICS)}, not {metrics}')
    names = EC2_METRICS[:metrics]
    salt = zlib.crc32(region.encode()) << 20
    return {region: [
        {'namespace': 'AWS/EC2', 'metric': name, 'dimensions': {'InstanceId': f'i-{salt + n:017x}'},
         'unit': EC2_UNITS.get(name, 'Count')}
        for n in range(1, instances + 1) for name in names]}


def expected_value(series, stat, timestamp, period, resolution=300):
    """The value the fake serves (by default) for a series dict, a statistic and
    the bucket of `period` seconds starting at `timestamp` (epoch seconds or
    aware datetime); None when the bucket holds no raw datapoint. `resolution`:
    the series' own 'resolution', else the fake's `period` (default 300).
    Average = (crc32 of the series % 1000) + (minute of the bucket % 1000) / 1000,
    Minimum/Maximum = Average -/+ 1, SampleCount = raw datapoints in the bucket
    (period / resolution when aligned), Sum = Average x SampleCount."""
    bucket = _epoch(timestamp)
    count, _ = _raw_points(bucket, period, series.get('resolution') or resolution)
    return _stat_value(_series_base(series), stat, bucket, count) if count else None


def write_cloudwatch_model(directory, protocol):
    """Write botocore's cloudwatch model, restricted to one wire protocol, under
    `directory` and return it: use it as AWS_DATA_PATH (or a session's
    'data_path') to make botocore speak that protocol, e.g. 'query' as
    botocore 1.37 in Func does, or 'smithy-rpc-v2-cbor'."""
    import os
    from botocore.loaders import create_loader
    if protocol not in ('json', 'smithy-rpc-v2-cbor', 'query'):
        raise ValueError(f'unknown protocol {protocol!r}')
    model = create_loader().load_service_model('cloudwatch', 'service-2')
    model['metadata'] = dict(model['metadata'], protocol=protocol, protocols=[protocol])
    version = model['metadata']['apiVersion']
    target = os.path.join(directory, 'cloudwatch', version)
    os.makedirs(target, exist_ok=True)
    with open(os.path.join(target, 'service-2.json'), 'w') as out:
        json.dump(model, out)
    return directory


class _Series:
    __slots__ = ('source', 'namespace', 'metric', 'dimensions', 'unit', 'resolution', 'missing',
                 'late', 'active', 'base', 'listing')

    def __init__(self, source, resolution):
        self.source = source
        self.namespace = source['namespace']
        self.metric = source['metric']
        self.dimensions = _dimension_dict(source.get('dimensions'))
        self.unit = source.get('unit') or 'Count'
        self.resolution = int(source.get('resolution') or resolution)
        self.missing = frozenset(_epoch(t) for t in source.get('missing') or ())
        self.late = {_epoch(t): _epoch(v) for t, v in (source.get('late') or {}).items()}
        self.active = source.get('active', True)
        self.base = _series_base(source)
        self.listing = {'Namespace': self.namespace, 'MetricName': self.metric,
                        'Dimensions': [{'Name': k, 'Value': v} for k, v in self.dimensions.items()]}


class _Estate:
    def __init__(self, series, resolution):
        self.series = [_Series(s, resolution) for s in series]
        self.index = {}
        for s in self.series:
            self.index[_series_key(s.namespace, s.metric, s.dimensions)] = s

    def find(self, namespace, metric, dimensions):
        """The series with exactly these dimensions (as GetMetricData matches), or None."""
        return self.index.get(_series_key(namespace, metric, _dimension_dict(dimensions)))


def _series_key(namespace, metric, dimensions):
    return namespace, metric, tuple(sorted(dimensions.items()))


def _dimension_dict(dimensions):
    if not dimensions:
        return {}
    if isinstance(dimensions, dict):
        return dict(dimensions)
    return {d['Name']: d.get('Value') for d in dimensions}


def _series_base(series):
    dims = sorted(_dimension_dict(series.get('dimensions')).items())
    text = f"{series['namespace']}|{series['metric']}|{dims}"
    return zlib.crc32(text.encode()) % 1000


def _raw_points(bucket, period, resolution):
    """(how many raw datapoints fall in [bucket, bucket + period), the last one)."""
    first = -(-bucket // resolution) * resolution
    if first >= bucket + period:
        return 0, None
    count = (bucket + period - first - 1) // resolution + 1
    return count, first + (count - 1) * resolution


def _stat_value(base, stat, bucket, count):
    average = base + (bucket // 60 % 1000) / 1000
    if stat == 'Average':
        return average
    if stat == 'Minimum':
        return average - 1
    if stat == 'Maximum':
        return average + 1
    if stat == 'SampleCount':
        return float(count)
    return average * count       # Sum


# -- paging --------------------------------------------------------------------

def _page_by_series(wanted, points, offset, limit):
    """Queries in request order from flat datapoint `offset`, up to `limit`
    datapoints; queries without datapoints ride along free. (results, next offset)."""
    results, budget, position = [], limit, 0
    for (query_id, label, *_), pts in zip(wanted, points):
        size = len(pts)
        end = position + size
        if offset and end <= offset:        # served on an earlier page
            position = end
            continue
        skip = max(0, offset - position)
        if size > skip and budget == 0:
            return results, position + skip
        take = pts[skip:skip + budget]
        budget -= len(take)
        if skip + len(take) < size:
            results.append(_result(query_id, label, take, 'PartialData'))
            return results, position + skip + len(take)
        results.append(_result(query_id, label, take, 'Complete'))
        position = end
    return results, None


def _page_by_time(wanted, points, offset, limit, descending):
    """Datapoints of all queries ordered by time (then query), from `offset`."""
    flat = sorted(((t, n, v) for n, pts in enumerate(points) for t, v in pts),
                  key=lambda p: (-p[0] if descending else p[0], p[1]))
    page = flat[offset:offset + limit]
    later = {n for _, n, _ in flat[offset + limit:]}
    by_query = {}
    for t, n, v in page:
        by_query.setdefault(n, []).append((t, v))
    results = []
    for n, (query_id, label, _, _, _) in enumerate(wanted):
        if n in by_query or (offset == 0 and not points[n]):
            status = 'PartialData' if n in later else 'Complete'
            results.append(_result(query_id, label, by_query.get(n, []), status))
    return results, (offset + limit if offset + limit < len(flat) else None)


def _result(query_id, label, pts, status):
    return {'Id': query_id, 'Label': label, 'Timestamps': [t for t, _ in pts],
            'Values': [v for _, v in pts], 'StatusCode': status}


# -- validation helpers -----------------------------------------------------------

def _window(params):
    start, end = _epoch(params.get('StartTime')), _epoch(params.get('EndTime'))
    if start >= end:
        raise FakeCloudWatchError(
            'ValidationError', 'The parameter StartTime must be less than the parameter EndTime.',
            violation=True)
    return start, end


def _period(value, where):
    try:
        period = int(value)
    except (TypeError, ValueError):
        period = 0
    if period < 60 or period % 60:
        raise FakeCloudWatchError(
            'ValidationError', f'The parameter {where} must be a multiple of 60 (got {value!r}).',
            violation=True)
    return period


def _check_stat(stat, where):
    if stat not in STATISTICS:
        raise FakeCloudWatchError(
            'ValidationError',
            f'The parameter {where} {stat!r} is not one the fake serves ({", ".join(STATISTICS)}).',
            violation=True)


def _first_bucket(start, period):
    # AWS rounds a recent StartTime down to the minute; buckets sit on multiples
    # of the period on the clock, from that time on.
    start = start // 60 * 60
    return -(-start // period) * period


class _Fingerprint:
    """A digest of a request's parameters but NextToken, computed on first use."""

    def __init__(self, params):
        self.params = params
        self._digest = None

    @property
    def digest(self):
        if self._digest is None:
            text = json.dumps(self.params, sort_keys=True, default=str)
            self._digest = hashlib.sha1(text.encode()).hexdigest()
        return self._digest


def _epoch(value):
    """Epoch seconds (int when whole) from a number, an aware datetime or ISO text."""
    if isinstance(value, datetime.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=datetime.timezone.utc)
        seconds = value.timestamp()
    elif isinstance(value, (int, float)):
        seconds = value
    elif isinstance(value, str):
        text = value.strip()
        try:
            seconds = float(text)
        except ValueError:
            if text.endswith('Z'):
                text = text[:-1] + '+00:00'
            try:
                parsed = datetime.datetime.fromisoformat(text)
            except ValueError:
                raise FakeCloudWatchError('ValidationError', f'bad timestamp {value!r}',
                                          violation=True)
            return _epoch(parsed)
    else:
        raise FakeCloudWatchError('ValidationError', f'missing or bad timestamp {value!r}',
                                  violation=True)
    return int(seconds) if seconds == int(seconds) else seconds


# -- protocols ---------------------------------------------------------------

def _protocol_of(path, headers):
    """How botocore serialized a request: the path (and header) of rpc-v2-cbor,
    the X-Amz-Target of json, else a query form."""
    if path.startswith('/service/') or headers.get('smithy-protocol') == 'rpc-v2-cbor':
        return 'smithy-rpc-v2-cbor'
    if headers.get('X-Amz-Target'):
        return 'json'
    return 'query'


class _CBORWriter(RpcV2CBORSerializer):
    """botocore's CBOR serializer, with epoch-second ints as timestamps written
    straight (tag 1 + integer, as botocore itself writes whole seconds) rather
    than through a datetime round trip."""

    def _serialize_type_timestamp(self, serialized, value, shape, key):
        if isinstance(value, int):
            serialized.extend(b'\xc1')
            self._serialize_type_integer(serialized, value, shape, key)
        else:
            super()._serialize_type_timestamp(serialized, value, shape, key)


def _from_query(form, shape):
    """Params of a query-protocol request (`A.member.1.B=x`) shaped like boto3's."""
    tree = {}
    for key, value in form.items():
        node = tree
        parts = key.split('.')
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):     # `List=` (empty) then `List.member.1`
                child = node[part] = {}
            node = child
        node.setdefault(parts[-1], value)
    return _shape_query(tree, shape)


def _shape_query(node, shape):
    kind = shape.type_name
    if kind == 'structure':
        out = {}
        for name, member in shape.members.items():
            wire = member.serialization.get('name', name)
            if wire in node:
                out[name] = _shape_query(node[wire], member)
        return out
    if kind == 'list':
        if not isinstance(node, dict):
            return []
        items = node.get(shape.member.serialization.get('name', 'member'), node)
        if not isinstance(items, dict):
            return []
        return [_shape_query(items[i], shape.member) for i in sorted(items, key=int)]
    if kind in ('integer', 'long'):
        return int(node)
    if kind in ('double', 'float'):
        return float(node)
    if kind == 'boolean':
        return node == 'true'
    return node


_ISO_CACHE = {}


def _iso(value):
    text = _ISO_CACHE.get(value)
    if text is None:
        text = time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(value)) if isinstance(value, int) \
            else datetime.datetime.fromtimestamp(value, datetime.timezone.utc).strftime(
                '%Y-%m-%dT%H:%M:%S.%fZ')
        if len(_ISO_CACHE) < 100000:
            _ISO_CACHE[value] = text
    return text


def _to_xml(shape, value, name, parts):
    kind = shape.type_name
    if kind == 'structure':
        parts.append(f'<{name}>')
        for key, item in value.items():
            if item is not None:
                member = shape.members[key]
                _to_xml(member, item, member.serialization.get('name', key), parts)
        parts.append(f'</{name}>')
    elif kind == 'list':
        parts.append(f'<{name}>')
        member_name = shape.member.serialization.get('name', 'member')
        for item in value:
            _to_xml(shape.member, item, member_name, parts)
        parts.append(f'</{name}>')
    elif kind == 'timestamp':
        parts.append(f'<{name}>{_iso(value)}</{name}>')
    elif kind == 'boolean':
        parts.append(f'<{name}>{"true" if value else "false"}</{name}>')
    elif kind in ('double', 'float'):
        parts.append(f'<{name}>{float(value)!r}</{name}>')
    else:
        parts.append(f'<{name}>{_xml_escape(str(value))}</{name}>')


# -- HTTP ----------------------------------------------------------------------

class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256     # benchmarks open many connections at once


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = 'HTTP/1.1'
    # Headers and body go out in one write, and without Nagle, so no
    # delayed-ACK stall (40 ms a request) on keep-alive connections.
    disable_nagle_algorithm = True
    timeout = 120
    fake = None

    def log_message(self, *args):
        pass

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get('Content-Length') or 0))
        status, headers, payload = self.fake._handle(self.path, self.headers, body)
        head = [f'HTTP/1.1 {status} {_REASONS.get(status, "Error")}',
                f'Content-Length: {len(payload)}']
        head.extend(f'{k}: {v}' for k, v in headers.items())
        self.wfile.write(('\r\n'.join(head) + '\r\n\r\n').encode('latin-1') + payload)

    def do_GET(self):
        payload = b'fake CloudWatch: POST only'
        self.wfile.write(b'HTTP/1.1 404 Not Found\r\nContent-Length: %d\r\n\r\n%s'
                         % (len(payload), payload))


def self_check():
    """Drive the fake with the installed boto3 in its default protocol (botocore
    1.37: query, 1.44: json) and in each forced one: paging, the 500-query limit,
    values, throttling retries. For interpreters without pytest (Func's 3.8 venv):
    `python tests/fake_cloudwatch.py`."""
    import tempfile
    import botocore
    from botocore.exceptions import ClientError
    t0 = 1699999200
    fake = FakeCloudWatch(ec2_estate(instances=100, metrics=12, region='cn-northwest-1'),
                          page_datapoints=7, throttle_every=5).start()
    fake.now = t0 + 86400
    series = fake.series('cn-northwest-1')
    queries = [{'Id': f'q{n}', 'MetricStat': {'Metric': {
        'Namespace': s['namespace'], 'MetricName': s['metric'],
        'Dimensions': [{'Name': k, 'Value': v} for k, v in s['dimensions'].items()]},
        'Period': 300, 'Stat': 'Sum'}} for n, s in enumerate(series)]
    protocols = [None]
    if botocore.session.Session().get_service_model('cloudwatch').metadata.get('targetPrefix'):
        protocols += ['json', 'smithy-rpc-v2-cbor', 'query']      # models that know them
    try:
        for protocol in protocols:
            fake.reset()
            client = fake.client('cn-northwest-1', protocol=protocol,
                                 model_dir=tempfile.mkdtemp() if protocol else None)
            pages = list(client.get_paginator('list_metrics').paginate(Namespace='AWS/EC2'))
            assert [len(p['Metrics']) for p in pages] == [500, 500, 200], 'ListMetrics pages'
            got = {}
            for page in client.get_paginator('get_metric_data').paginate(
                    MetricDataQueries=queries[:10], StartTime=t0 + 450, EndTime=t0 + 1800,
                    ScanBy='TimestampAscending'):
                for r in page['MetricDataResults']:
                    got.setdefault(r['Id'], []).extend(zip(r['Timestamps'], r['Values']))
            for n, s in enumerate(series[:10]):
                assert [(t.timestamp() - t0, v) for t, v in got[f'q{n}']] == [
                    (b, expected_value(s, 'Sum', t0 + b, 300)) for b in (600, 900, 1200, 1500)]
            try:
                client.get_metric_data(MetricDataQueries=queries[:501], StartTime=t0, EndTime=t0 + 300)
                raise AssertionError('501 queries were accepted')
            except ClientError as error:
                assert error.response['Error']['Code'] == 'ValidationError'
            assert len(fake.violations) == 1 and not fake.unfollowed_tokens()
            assert fake.throttled > 0
            used = {c['protocol'] for c in fake.calls}
            print(f'botocore {botocore.__version__}: {protocol or "default"} -> {used}: ok '
                  f'({len(fake.calls)} requests, {fake.throttled} throttled and retried)')
    finally:
        fake.stop()
    return 0


if __name__ == '__main__':
    raise SystemExit(self_check())


__all__ = ['FakeCloudWatch', 'FakeCloudWatchError', 'ec2_estate', 'expected_value',
           'write_cloudwatch_model',
           'EC2_METRICS', 'STATISTICS', 'MAX_QUERIES']
