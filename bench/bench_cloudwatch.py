"""CloudWatch collection benchmark: this collector (through Runner.run, as users
run it) against a naive GetMetricStatistics loop and against the lower bound,
on the fake CloudWatch endpoint of tests/fake_cloudwatch.py with injected latency.

    python bench/bench_cloudwatch.py            # 1,000 instances x 14 metrics x 5 stats, ~10 min
    python bench/bench_cloudwatch.py --quick    # 100 instances, one round: a smoke run (< 1 min)
    python bench/bench_cloudwatch.py --protocol query   # only the wire protocol of Func's botocore

Scenario: one region, `instances` EC2 instances x 14 metrics (the first 14 of
the default EC2 set), all 5 statistics, period 300, 50 ms added to every
answer. It runs for each wire protocol: the one the installed botocore picks
for cloudwatch (json for botocore 1.43/1.44) and `query` (form-encoded
requests, XML answers: what botocore 1.37, Func's, speaks), forced through a
copy of the service model (AWS_DATA_PATH). --quick runs the first only.

What is measured, each figure the median of --repeat fresh (spawned) processes,
all in this one invocation, so the ratios compare runs made side by side:

  ours     Runner(cloudwatch.DataCollector(account, {'regions': [...]})).run(),
           line protocol to /dev/null, run twice in one process with the same
           local DFF.CACHE: the COLD run (now = T: ListMetrics discovery, every
           page) and the STEADY-STATE run (now = T + one period: the ListMetrics
           answer is fresh in the cache, one new bucket to write; the window
           also re-reads the 2 buckets before it, as every run does). Before
           either, the process has made one session and client (what a
           long-lived worker has loaded already). API calls are counted by the
           fake's recorder and cross-checked with the collector's own count.
  naive    what a naive script does: for each instance, for each metric, one
           GetMetricStatistics call with all 5 statistics, sequentially, over
           the steady-state run's window, points kept in a list. It is given
           the instance list for free (no discovery). It runs on a sample of
           --naive-instances instances (default 50: 700 calls) and its wall
           and CPU are scaled to the estate (x instances / sample): the loop is
           sequential and every call costs the same, so its time is linear in
           the calls (--naive-instances 1000 runs it whole, about 12 minutes).
  parse    botocore's parse CPU for the SAME response bytes the collector got
           (recorded by the fake), replayed through the parser botocore builds
           by default ("botocore parse") and through the one our sessions
           configure (a standard-library timestamp parser in place of
           dateutil's: "our parse").

Bound = max(ceil(GetMetricData calls / concurrency) x latency
            [+ ListMetrics pages x latency for the cold run: they follow one
            another through NextToken],
            parse CPU of the same responses)
where the parse CPU is the faster of the two parsers (the least CPU botocore
needs for those bytes): the calls cannot overlap more than `concurrency`, 4 by
default, allows, and parsing holds the GIL.

Goals (issue 9 item 7): steady-state API calls = ceil(queries / 500) +
GetMetricData continuation pages, no ListMetrics while the cache is fresh;
wall >= 20x faster than the naive loop; our CPU <= 1.3x that parse CPU (the
ratio to botocore's default parser alone is shown too). When the CPU goal is
missed, a cProfile of one steady-state run (every thread, on a 200-instance
estate) is printed with the share of each part (--profile prints it anyway).
--from-json FILE prints the report of an earlier --json run again.

The fake is made fast: each answer is computed once (in an unmeasured priming
run without latency) and kept by request bytes; the measured runs get the kept
bytes after the latency, so the fake's own CPU (in this parent process) does
not slow the measured child. It also answers sts:GetCallerIdentity
(AWS_ENDPOINT_URL_STS points at it), and checks no signature.
"""
import argparse
import cProfile
import io
import json
import math
import multiprocessing
import os
import pickle
import pstats
import re
import shutil
import statistics
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, 'tests'))

REGION = 'us-east-1'
PERIOD = 300
STATS = ('Average', 'Maximum', 'Minimum', 'SampleCount', 'Sum')
NOW = 1_800_000_000 // PERIOD * PERIOD + 17       # the cold run's "now"
DELAY = 600                                       # the collector's default for period 300
CONCURRENCY = 4                                   # the collector's default
MAX_QUERIES = 500
SCENARIO = {'name': '1,000 instances x 14 metrics x 5 stats, 50 ms', 'instances': 1000,
            'metrics': 14, 'latency': 0.050, 'naive_instances': 50}
QUICK = {'name': '100 instances x 14 metrics x 5 stats, 50 ms', 'instances': 100,
         'metrics': 14, 'latency': 0.050, 'naive_instances': 20}
ACCOUNT = {'ak_id': 'AKIAEXAMPLE000000001', 'ak_secret': 'benchmark-secret-not-real'}
STS_XML = ('<GetCallerIdentityResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">'
           '<GetCallerIdentityResult><Arn>arn:aws:iam::123456789012:user/bench</Arn>'
           '<UserId>AIDAEXAMPLE</UserId><Account>123456789012</Account></GetCallerIdentityResult>'
           '<ResponseMetadata><RequestId>bench</RequestId></ResponseMetadata>'
           '</GetCallerIdentityResponse>').encode()
SCOPE_RE = re.compile(r'Credential=[^/]+/\d+/([^/]+)/([^/]+)/')


def steady_window():
    """[start, end) of the steady-state run (now = NOW + PERIOD): the new bucket
    and the REREAD_BUCKETS (2) before it."""
    end = (NOW + PERIOD - DELAY) // PERIOD * PERIOD
    return end - 3 * PERIOD, end


# -- the fake, made fast --------------------------------------------------------

def make_fake(instances, metrics):
    from fake_cloudwatch import FakeCloudWatch, ec2_estate

    local = threading.local()

    class Calls(list):
        """The recorder's list: remembers, per thread, the call it last got."""
        def append(self, call):
            local.last = call
            super().append(call)

    class BenchFake(FakeCloudWatch):
        """FakeCloudWatch whose answers are computed once and then replayed by
        request bytes, with `wire_latency` added to every answer (hit or not);
        it answers sts:GetCallerIdentity too."""

        def __init__(self, *args, **kwargs):
            self.wire_latency = 0.0
            self.memo = {}
            super().__init__(*args, **kwargs)

        def reset(self):
            super().reset()
            self.calls = Calls()

        def _handle(self, path, headers, body):
            scope = SCOPE_RE.search(headers.get('Authorization', ''))
            if (scope and scope.group(2) == 'sts') or b'Action=GetCallerIdentity' in body:
                call = {'operation': 'GetCallerIdentity', 'region': scope and scope.group(1),
                        'protocol': 'query', 'queries': 0, 'next_token_in': False,
                        'next_token_out': False, 'datapoints_out': 0, 'metrics_out': 0,
                        'status': 200, 'error': None, 'time': time.time(), 'key': None}
                with self._lock:
                    self.calls.append(call)
                time.sleep(self.wire_latency)
                return 200, {'Content-Type': 'text/xml'}, STS_XML
            key = (path, headers.get('X-Amz-Target'), scope and scope.group(1), bytes(body))
            hit = self.memo.get(key)
            if hit is None:
                status, reply, payload = super()._handle(path, headers, body)
                template = dict(local.last, key=key)
                local.last['key'] = key
                if status == 200:
                    self.memo[key] = (status, reply, payload, template)
            else:
                status, reply, payload, template = hit
                with self._lock:
                    self.calls.append(dict(template, time=time.time()))
            time.sleep(self.wire_latency)
            return status, reply, payload

    estate = ec2_estate(instances=instances, metrics=metrics, region=REGION)
    # The fake's clock at the steady-state run's now: every bucket of both
    # windows is served.
    return BenchFake(estate, period=PERIOD, latency=0.0, clock=lambda: NOW + PERIOD).start()


# -- what each child process measures ----------------------------------------------

def _child_env(url, data_path):
    os.environ.update({
        'AWS_ENDPOINT_URL_CLOUDWATCH': url, 'AWS_ENDPOINT_URL_STS': url,
        'AWS_SHARED_CREDENTIALS_FILE': os.devnull, 'AWS_CONFIG_FILE': os.devnull,
        'AWS_EC2_METADATA_DISABLED': 'true', 'INTEGRATION_FORCE': '1',
        'INTEGRATION_STATE_DIR': tempfile.mkdtemp(prefix='bench-cw-state-'),
    })
    for name in ('AWS_ENDPOINT_URL', 'AWS_PROFILE', 'AWS_ACCESS_KEY_ID', 'AWS_SECRET_ACCESS_KEY',
                 'AWS_SESSION_TOKEN', 'AWS_DATA_PATH'):
        os.environ.pop(name, None)
    if data_path:
        os.environ['AWS_DATA_PATH'] = data_path
    import logging
    logging.getLogger('integration').setLevel(logging.WARNING)


def _child_done(queue_out, figures):
    """A child's figures to the bench; its state folder removed (multiprocessing's
    children end without atexit)."""
    shutil.rmtree(os.environ['INTEGRATION_STATE_DIR'], ignore_errors=True)
    queue_out.put(figures)


def _child_ours(url, data_path, profile, queue_out):
    """Two Runner runs in one process, same cache: cold (now = NOW), steady
    (now = NOW + PERIOD)."""
    _child_env(url, data_path)
    import integration_aws_auth as auth
    import integration_aws_cloudwatch__main as cw
    import integration_core__runner as core
    import integration_local.runtime as local_runtime
    # Warm-up: what a long-lived worker has loaded already (service models).
    warm = auth.get_session(ACCOUNT, region=REGION)
    warm.client('cloudwatch', region_name=REGION)
    warm.client('sts', region_name=REGION)
    sink = open(os.devnull, 'w')
    core._RUNTIME['dff'] = local_runtime.LocalDFF(
        output=local_runtime.LineProtocolWriter(sink, 'null'))
    out = {}
    for name, now in (('cold', NOW), ('steady', NOW + PERIOD)):
        collector = cw.DataCollector(ACCOUNT, {'regions': [REGION]}, now=lambda now=now: now)
        profiler = _ThreadProfiler() if profile and name == 'steady' else None
        stamp, wall, cpu = time.time(), time.perf_counter(), time.process_time()
        if profiler:
            profiler.start()
        summary = core.Runner(collector).run()
        if profiler:
            profiler.stop()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        region = summary['collectors'][0]['regions'][0]
        out[name] = {'wall': wall, 'cpu': cpu, 'start': stamp, 'end': time.time(),
                     'points': summary['points_written'], 'series': region['series'],
                     'queries': region['queries'], 'api_calls': region['api_calls'],
                     'calls': dict(region['calls']), 'discovery': region['discovery']}
        if profiler:
            out['profile'] = profiler.report()
    _child_done(queue_out, out)


def _child_naive(url, data_path, instance_ids, metric_names, queue_out):
    """The naive loop: one GetMetricStatistics call per metric per instance,
    all statistics in it, one after another; points kept in a list."""
    _child_env(url, data_path)
    import datetime
    import boto3
    client = boto3.session.Session(
        aws_access_key_id=ACCOUNT['ak_id'], aws_secret_access_key=ACCOUNT['ak_secret'],
        region_name=REGION).client('cloudwatch')
    start, end = steady_window()
    start = datetime.datetime.fromtimestamp(start, datetime.timezone.utc)
    end = datetime.datetime.fromtimestamp(end, datetime.timezone.utc)
    stamp, wall, cpu = time.time(), time.perf_counter(), time.process_time()
    points = []
    for instance_id in instance_ids:
        for metric in metric_names:
            resp = client.get_metric_statistics(
                Namespace='AWS/EC2', MetricName=metric,
                Dimensions=[{'Name': 'InstanceId', 'Value': instance_id}],
                StartTime=start, EndTime=end, Period=PERIOD, Statistics=list(STATS))
            for dp in resp['Datapoints']:
                points.append({'measurement': 'aws_AWS/EC2',
                               'tags': {'InstanceId': instance_id, 'RegionId': REGION},
                               'fields': {f'{metric}_{s}': float(dp[s]) for s in STATS if s in dp},
                               'timestamp': int(dp['Timestamp'].timestamp()) * 10**9})
    _child_done(queue_out, {'wall': time.perf_counter() - wall, 'cpu': time.process_time() - cpu,
                            'start': stamp, 'end': time.time(), 'points': len(points)})


def _child_parse(url, data_path, bodies_file, queue_out):
    """botocore's parse CPU for the recorded responses: through the parser of
    the collector's own client (our session), and botocore's default one."""
    _child_env(url, data_path)
    import boto3
    from botocore.awsrequest import HTTPHeaders
    import integration_aws_auth as auth
    with open(bodies_file, 'rb') as f:
        recorded = pickle.load(f)
    ours = auth.get_session(ACCOUNT, region=REGION).client('cloudwatch', region_name=REGION)
    default = boto3.session.Session(
        aws_access_key_id=ACCOUNT['ak_id'], aws_secret_access_key=ACCOUNT['ak_secret'],
        region_name=REGION).client('cloudwatch')
    out = {}
    for label, client in (('ours', ours), ('default', default)):
        model = client.meta.service_model
        protocol = getattr(model, 'resolved_protocol', None) or model.metadata['protocol']
        factory = client._endpoint._response_parser_factory
        for run, responses in recorded.items():
            total = 0.0
            for operation, headers, body in responses:
                op = model.operation_model(operation)
                response = {'headers': HTTPHeaders(headers), 'status_code': 200, 'body': body,
                            'context': {'operation_name': operation}}
                started = time.process_time()
                factory.create_parser(protocol).parse(response, op.output_shape)
                total += time.process_time() - started
            out[f'{run}_{label}'] = total
        out['protocol'] = protocol
    _child_done(queue_out, out)


class _ThreadProfiler:
    """cProfile of every thread (the collector parses in its pool threads)."""

    def __init__(self):
        self.profiles = []
        self.lock = threading.Lock()

    def _hook(self, *args):
        profile = cProfile.Profile()
        with self.lock:
            self.profiles.append(profile)
        sys.setprofile(None)
        profile.enable()

    def start(self):
        self.main = cProfile.Profile()
        threading.setprofile(self._hook)
        self.main.enable()

    def stop(self):
        self.main.disable()
        threading.setprofile(None)

    # Where the CPU goes: cumulative time of these functions, as a share of
    # all profiled time spent running (waits on locks and sockets left out).
    PARTS = [
        ('botocore: parse the responses', 'botocore/parsers.py', 'parse'),
        ('botocore: validate the request parameters', 'botocore/validate.py', 'validate'),
        ('botocore: serialize the request', 'botocore/serialize.py', 'serialize_to_request'),
        ('botocore: sign the request', 'botocore/auth.py', 'add_auth'),
        ('botocore: send / receive (urllib3)', 'botocore/httpsession.py', 'send'),
        ('ours: build queries, read answers (_read own time)', 'cloudwatch__main.py', '_read'),
        ('ours: answers to points (_points)', 'cloudwatch__main.py', '_points'),
        ('ours: points to line protocol (to_line_protocol)', 'core__runner.py', 'to_line_protocol'),
        ('ours: keep the written buckets (_save_state)', 'cloudwatch__main.py', '_save_state'),
        ('ours: the cached ListMetrics answer (_series)', 'cloudwatch__main.py', '_series'),
    ]
    WAITS = ("acquire' of '_thread.lock", 'recv_into', 'time.sleep', 'select', 'poll', "'wait'")

    def report(self, top=25):
        stream = io.StringIO()
        stats = pstats.Stats(self.main, stream=stream)
        for profile in self.profiles:
            try:
                stats.add(profile)
            except TypeError:       # a thread that never ran a call
                pass
        running = sum(tt for key, (_, _, tt, _, _) in stats.stats.items()
                      if not any(w in pstats.func_std_string(key) for w in self.WAITS))
        stream.write(f'profiled CPU (waits excluded): {running:.2f} s (cProfile slows Python code '
                     'several times over: read the shares)\n')
        socket_wait = sum(tt for key, (_, _, tt, _, _) in stats.stats.items()
                          if 'recv_into' in pstats.func_std_string(key))
        for label, file_part, func in self.PARTS:
            own = func == '_read'
            total = sum((tt if own else ct) for (filename, _, name), (_, _, tt, ct, _) in stats.stats.items()
                        if filename.endswith(file_part) and name == func)
            if func == 'send':          # less the time waiting for the answers
                total -= socket_wait
            stream.write(f'  {total / running * 100:5.1f}%  {label}\n')
        stream.write('\n')
        stats.sort_stats('tottime').print_stats(top)
        return stream.getvalue()


# -- the parent: spawn, collect, medians -------------------------------------------

def spawn(target, *args, timeout=3600):
    ctx = multiprocessing.get_context('spawn')
    queue_out = ctx.Queue()
    proc = ctx.Process(target=target, args=args + (queue_out,))
    proc.start()
    result = queue_out.get(timeout=timeout)
    proc.join(60)
    return result


def calls_between(fake, start, end):
    with fake._lock:
        return [c for c in fake.calls if start <= c['time'] <= end]


def count_calls(calls):
    out = {'GetMetricData': 0, 'GetMetricData_pages': 0, 'ListMetrics': 0,
           'GetMetricStatistics': 0, 'GetCallerIdentity': 0, 'throttled': 0}
    for call in calls:
        op = call['operation']
        out[op] = out.get(op, 0) + 1
        if op == 'GetMetricData' and call['next_token_in']:
            out['GetMetricData_pages'] += 1
        if call['error'] == 'Throttling':
            out['throttled'] += 1
    return out


def median_of(runs, key):
    return statistics.median(r[key] for r in runs)


def prime(fake, data_path, sample, metric_names):
    """Unmeasured, without latency: every answer is computed once and kept.
    Returns the recorded response bytes of the cold and steady-state runs."""
    fake.wire_latency = 0.0
    primed = spawn(_child_ours, fake.url, data_path, False)
    if sample:
        spawn(_child_naive, fake.url, data_path, sample, metric_names)
    fake.assert_clean()         # no 501-query call, no page dropped, no bad request
    recorded = {}
    for run_name in ('cold', 'steady'):
        calls = calls_between(fake, primed[run_name]['start'], primed[run_name]['end'])
        recorded[run_name] = [(c['operation'], fake.memo[c['key']][1], fake.memo[c['key']][2])
                              for c in calls if c['operation'] in ('ListMetrics', 'GetMetricData')]
    fake.reset()
    return recorded


def run(scenario, protocol, repeat, naive_instances):
    """One protocol: `repeat` rounds of ours (cold + steady), naive, parse."""
    instances, metrics, latency = scenario['instances'], scenario['metrics'], scenario['latency']
    model_dir = tempfile.mkdtemp(prefix='bench-cw-model-') if protocol else None
    if protocol:
        from fake_cloudwatch import write_cloudwatch_model
        write_cloudwatch_model(model_dir, protocol)
    fake = make_fake(instances, metrics)
    series = fake.series(REGION)
    instance_ids = list(dict.fromkeys(s['dimensions']['InstanceId'] for s in series))
    metric_names = list(dict.fromkeys(s['metric'] for s in series))
    sample = instance_ids[:naive_instances]
    scale = len(instance_ids) / len(sample)
    label = protocol or 'default'
    try:
        print(f'  [{label}] priming the fake ({len(series):,} series) ...', file=sys.stderr)
        recorded = prime(fake, model_dir, sample, metric_names)
        fake.wire_latency = latency
        ours_runs, naive_runs, parse_runs = [], [], []
        with tempfile.NamedTemporaryFile(suffix='.pickle', delete=False) as f:
            pickle.dump(recorded, f)
            bodies_file = f.name
        try:
            for n in range(repeat):
                print(f'  [{label}] round {n + 1}/{repeat}: ours, naive '
                      f'({len(sample) * len(metric_names):,} calls), parse ...', file=sys.stderr)
                fake.reset()
                ours = spawn(_child_ours, fake.url, model_dir, False)
                for run_name in ('cold', 'steady'):
                    r = ours[run_name]
                    r['recorded'] = count_calls(calls_between(fake, r['start'], r['end']))
                ours_runs.append(ours)
                fake.reset()
                naive = spawn(_child_naive, fake.url, model_dir, sample, metric_names)
                naive['recorded'] = count_calls(calls_between(fake, naive['start'], naive['end']))
                naive_runs.append(naive)
                parse_runs.append(spawn(_child_parse, fake.url, model_dir, bodies_file))
        finally:
            os.unlink(bodies_file)
    finally:
        fake.stop()
    parse = {k: median_of(parse_runs, k) for k in parse_runs[0] if k != 'protocol'}
    naive = {'wall': median_of(naive_runs, 'wall') * scale, 'cpu': median_of(naive_runs, 'cpu') * scale,
             'sample_wall': median_of(naive_runs, 'wall'),
             'sample_calls': len(sample) * len(metric_names), 'recorded': naive_runs[-1]['recorded']}
    row = {'protocol': parse_runs[0]['protocol'], 'forced': bool(protocol), 'model_dir': model_dir,
           'instances': instances, 'metrics': metrics, 'series': len(series),
           'queries': len(series) * len(STATS), 'latency': latency, 'concurrency': CONCURRENCY,
           'repeat': repeat, 'naive': naive, 'parse': parse,
           'rounds': [{k: {x: o[k][x] for x in ('wall', 'cpu')} for k in ('cold', 'steady')}
                      for o in ours_runs],
           'naive_rounds': [{x: r[x] for x in ('wall', 'cpu')} for r in naive_runs]}
    last = ours_runs[-1]
    for name in ('cold', 'steady'):
        r = {k: median_of([o[name] for o in ours_runs], k) for k in ('wall', 'cpu')}
        rec = last[name]['recorded']
        for other in ours_runs:            # the calls are the same in every round
            assert other[name]['recorded'] == rec, (name, other[name]['recorded'], rec)
        r.update(recorded=rec, points=last[name]['points'], discovery=last[name]['discovery'],
                 collector_calls=last[name]['calls'], collector_api_calls=last[name]['api_calls'])
        row[name] = r
    return finish(row)


def finish(row):
    """Bounds and goals from the measured figures (also for --from-json)."""
    parse, naive, latency = row['parse'], row['naive'], row['latency']
    for name in ('cold', 'steady'):
        r = row[name]
        rec = r['recorded']
        waves = math.ceil(rec['GetMetricData'] / row['concurrency']) + rec['ListMetrics']
        # The least CPU botocore needs to parse these bytes: the faster of its
        # default parser and the one our sessions configure.
        r['parse'] = min(parse[name + '_default'], parse[name + '_ours'])
        r['bound_latency'] = waves * latency
        r['bound'] = max(waves * latency, r['parse'])
    s = row['steady']
    expected = math.ceil(row['queries'] / MAX_QUERIES) + s['recorded']['GetMetricData_pages']
    cpu_ratio = s['cpu'] / s['parse']
    row['goals'] = {
        'calls': {'expected': expected, 'got': s['recorded']['GetMetricData'],
                  'list_metrics': s['recorded']['ListMetrics'],
                  'ok': s['recorded']['GetMetricData'] == expected and s['recorded']['ListMetrics'] == 0},
        'wall': {'ratio': naive['wall'] / s['wall'], 'ok': naive['wall'] / s['wall'] >= 20},
        'cpu': {'ratio': cpu_ratio, 'ok': cpu_ratio <= 1.3,
                'ratio_default_parse': s['cpu'] / parse['steady_default']},
    }
    return row


def profile_steady(protocol, model_dir, instances=200):
    """cProfile (every thread) of one steady-state run on a smaller estate
    (the shares per call are the same)."""
    fake = make_fake(instances, SCENARIO['metrics'])
    try:
        prime(fake, model_dir, [], [])
        fake.wire_latency = SCENARIO['latency']
        return spawn(_child_ours, fake.url, model_dir, True)['profile']
    finally:
        fake.stop()


def report(rows, scenario):
    first = rows[0]
    lines = [
        f"scenario: {scenario['name']}: {first['series']:,} series, {first['queries']:,} queries a run, "
        f"concurrency {first['concurrency']}; each figure the median of {first['repeat']} fresh processes",
        '',
        '| protocol | run | wall (s) | bound (s) | ours / bound | naive / ours | CPU (s) '
        '| parse CPU: botocore default / our sessions (s) | CPU / parse | CPU / default parse '
        '| API calls: GetMetricData (+pages), ListMetrics, STS | points |',
        '|---|---|---|---|---|---|---|---|---|---|---|---|',
    ]
    for row in rows:
        n, p = row['naive'], row['parse']
        proto = row['protocol'] + (' (forced)' if row['forced'] else '')
        for name, title in (('cold', 'cold: ListMetrics'), ('steady', 'steady state: cache fresh')):
            r, rec = row[name], row[name]['recorded']
            lines.append(
                f"| {proto} | {title} | {r['wall']:.2f} | {r['bound']:.2f} | {r['wall'] / r['bound']:.2f}x "
                f"| {n['wall'] / r['wall']:.0f}x | {r['cpu']:.2f} "
                f"| {p[name + '_default']:.2f} / {p[name + '_ours']:.2f} "
                f"| {r['cpu'] / r['parse']:.2f}x | {r['cpu'] / p[name + '_default']:.2f}x "
                f"| {rec['GetMetricData']} (+{rec['GetMetricData_pages']}), {rec['ListMetrics']}, "
                f"{rec['GetCallerIdentity']} | {r['points']:,} |")
        lines.append(
            f"| {proto} | naive GetMetricStatistics loop | {n['wall']:.1f} | | | 1x | {n['cpu']:.2f} | | | "
            f"| {row['instances'] * row['metrics']:,} GetMetricStatistics | |")
    lines.append('')
    for row in rows:
        n, g = row['naive'], row['goals']
        lines += [
            f"{row['protocol']}: naive measured on {n['sample_calls']:,} calls "
            f"({n['sample_calls'] // row['metrics']} instances, {n['sample_wall']:.1f} s), scaled "
            f"x{row['instances'] * row['metrics'] / n['sample_calls']:.0f}; goals:",
            f"  steady-state API calls = ceil({row['queries']:,} / 500) + pages = {g['calls']['expected']}, "
            f"no ListMetrics: {g['calls']['got']} GetMetricData, {g['calls']['list_metrics']} ListMetrics "
            f"-> {'MET' if g['calls']['ok'] else 'MISSED'}",
            f"  wall >= 20x faster than naive: {g['wall']['ratio']:.0f}x -> "
            f"{'MET' if g['wall']['ok'] else 'MISSED'}",
            f"  CPU <= 1.3x the parse CPU ({row['steady']['parse']:.2f} s): {g['cpu']['ratio']:.2f}x -> "
            + ('MET' if g['cpu']['ok'] else f"MISSED by {(g['cpu']['ratio'] / 1.3 - 1) * 100:.0f}% "
               f"({row['steady']['cpu'] - 1.3 * row['steady']['parse']:.2f} s of CPU over)")
            + f"; against botocore's default parser alone: {g['cpu']['ratio_default_parse']:.2f}x",
        ]
    return '\n'.join(lines)


def git_state():
    import subprocess
    try:
        return subprocess.run(['git', '-C', ROOT, 'describe', '--always', '--dirty'],
                              capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--quick', action='store_true',
                        help="100 instances, one round, the installed botocore's protocol only (< 1 min)")
    parser.add_argument('--repeat', type=int, help='fresh processes per figure (median; default 3, '
                        '--quick 1)')
    parser.add_argument('--instances', type=int, help='instances in the estate (default 1000)')
    parser.add_argument('--naive-instances', type=int,
                        help='instances the naive loop runs on, scaled to the estate (default 50)')
    parser.add_argument('--protocol', choices=('default', 'json', 'smithy-rpc-v2-cbor', 'query'),
                        action='append',
                        help="botocore's wire protocol for cloudwatch, repeatable (default: what the "
                        "installed botocore picks, then 'query', what Func's botocore 1.37 speaks)")
    parser.add_argument('--profile', action='store_true',
                        help='print a cProfile of a steady-state run even when the goals are met')
    parser.add_argument('--json', metavar='FILE', help='also write the raw figures')
    parser.add_argument('--from-json', metavar='FILE', help='print the report of an earlier --json run')
    args = parser.parse_args()
    if args.from_json:
        with open(args.from_json) as f:
            saved = json.load(f)
        rows = [finish(row) for row in saved['rows']]
        print(f"{saved['date']}, commit {saved['commit']}, Python {saved['python']}, botocore "
              f"{saved['botocore']}, {saved['seconds']} s\n")
        print(report(rows, saved['scenario']))
        for row in rows:
            if row.get('profile'):
                print(f"\ncProfile of one steady-state run, {row['protocol']} (all threads):\n"
                      + row['profile'])
        return
    scenario = dict(QUICK if args.quick else SCENARIO)
    if args.instances:
        scenario['instances'] = args.instances
        scenario['name'] = f"{args.instances:,} instances x 14 metrics x 5 stats, 50 ms"
    naive_instances = min(args.naive_instances or scenario['naive_instances'], scenario['instances'])
    repeat = args.repeat or (1 if args.quick else 3)
    protocols = args.protocol or (['default'] if args.quick else ['default', 'query'])
    protocols = [None if p == 'default' else p for p in protocols]
    import botocore
    print(f'bench_cloudwatch: Python {sys.version.split()[0]}, botocore {botocore.__version__}, '
          f'{os.cpu_count()} CPU(s)', file=sys.stderr)
    started = time.monotonic()
    rows = []
    try:
        for protocol in protocols:
            rows.append(run(scenario, protocol, repeat, naive_instances))
        missed = [r for r in rows if not r['goals']['cpu']['ok']]
        if args.profile or missed:
            target = (missed or rows)[0]
            print(f"  [{target['protocol']}] profiling one steady-state run (cProfile, every thread) ...",
                  file=sys.stderr)
            target['profile'] = profile_steady(target['protocol'] if target['forced'] else None,
                                               target['model_dir'])
    finally:
        for row in rows:
            if row['model_dir']:
                shutil.rmtree(row['model_dir'], ignore_errors=True)
    print(report(rows, scenario))
    for row in rows:
        if row.get('profile'):
            print(f"\ncProfile of one steady-state run, {row['protocol']}, 200 instances "
                  f"(all threads):\n" + row['profile'])
    if args.json:
        with open(args.json, 'w') as f:
            json.dump({'scenario': scenario, 'python': sys.version.split()[0],
                       'botocore': botocore.__version__, 'commit': git_state(),
                       'date': time.strftime('%Y-%m-%d'), 'seconds': round(time.monotonic() - started),
                       'rows': rows}, f, indent=2, default=str)
    print(f'\n(bench took {time.monotonic() - started:.0f} s)', file=sys.stderr)


if __name__ == '__main__':
    main()
