"""The CloudWatch collector: values on moto (IAM enforcement on) for every auth
method, limits, pages and throttling on a fake CloudWatch that enforces them
(tests/fake_cloudwatch.py), the line protocol through a real InfluxDB, and the
linkage to the EC2 objects."""
import datetime
import math
import os

import pytest

import integration_aws_cloudwatch__main as cw
import integration_aws_ec2__main as ec2
import integration_core__runner as core
from conftest import ROOT, account_of, unique
from integration_local.emulator import ImdsServer
from fake_cloudwatch import FakeCloudWatch, ec2_estate, expected_value
from servers import DataKitReceiver, FaultProxy

PERIOD = 300
NOW = 1_800_000_000 // PERIOD * PERIOD + 17          # "now", a little past a bucket boundary
END = (NOW - 600) // PERIOD * PERIOD                 # the first run's window end (delay 600)


def put(aws, region, instance_id, metric, second, value, namespace='AWS/EC2'):
    aws.client('cloudwatch', region).put_metric_data(Namespace=namespace, MetricData=[{
        'MetricName': metric, 'Dimensions': [{'Name': 'InstanceId', 'Value': instance_id}],
        'Timestamp': datetime.datetime.fromtimestamp(second, datetime.timezone.utc),
        'Value': value}])


def by_series(points):
    """{(InstanceId, metric, bucket second): point}; one point per series and bucket."""
    out = {}
    for p in points:
        metric = sorted(p['fields'])[0].rsplit('_', 1)[0]
        key = (p['tags']['InstanceId'], metric, p['timestamp'] // 10**9)
        assert key not in out, f'two points for {key}'
        out[key] = p
    return out


# -- configuration: one line per mistake, before any AWS call ---------------------

BAD = [
    ({'regions': ['us-east-1'], 'period': 120}, "collector_configs['period'] must be 60 or 300"),
    ({'regions': ['us-east-1'], 'statistics': ['Avg']},
     "collector_configs['statistics'][0] 'Avg' is not a statistic; did you mean 'Average'?"),
    ({'regions': ['us-east-1'], 'statistics': 'Average'}, "collector_configs['statistics'] must be a non-empty list"),
    ({'regions': ['us-east-1'], 'targets': []}, "collector_configs['targets'] must be a non-empty list"),
    ({'regions': ['us-east-1'], 'targets': [{'namespace': 'AWS/EC2', 'metric': ['CPU*']}]},
     "collector_configs['targets'][0]['metric'] is not a known key; did you mean 'metrics'?"),
    ({'regions': ['us-east-1'], 'targets': [{'metrics': ['CPU*']}]},
     "collector_configs['targets'][0]['namespace'] must be a CloudWatch namespace such as 'AWS/EC2' "
     "(got None)"),
    ({'regions': ['us-east-1'], 'targets': [{'namespace': 'AWS/EC2', 'metrics': 'CPU*'}]},
     "collector_configs['targets'][0]['metrics'] must be 'ALL' or a non-empty list"),
    ({'regions': ['us-east-1'], 'targets': [{'namespace': 'AWS/EC2', 'metrics': ['NOT']}]},
     "['NOT'] excludes nothing"),
    ({'regions': ['us-east-1'], 'targets': [{'namespace': 'AWS/EC2', 'dimensions': 'InstanceId'}]},
     "collector_configs['targets'][0]['dimensions'] must be a list of dimension names"),
    ({'regions': ['us-east-1'], 'delay': -5}, "collector_configs['delay'] must be a whole number from 0 to 3600"),
    ({'regions': ['us-east-1'], 'concurrency': 0}, "collector_configs['concurrency'] must be a whole number from 1 to 16"),
    ({'regions': ['us-east-1'], 'backfill': 99999}, "collector_configs['backfill'] must be a whole number from 300 to 10800"),
    ({'regions': ['us-east-1'], 'retry_mode': 'fast'}, "collector_configs['retry_mode'] must be 'adaptive' or 'standard'"),
    ({'regions': ['us-east-1'], 'periods': 60}, "collector_configs['periods'] is not a known key; did you mean 'period'?"),
    ({'regions': ['us-east-2x']}, "collector_configs['regions'][0] 'us-east-2x' is not an AWS region"),
    ({}, "collector_configs['regions'] is missing"),
    # Values that would pass and then collect nothing, or fail in a region.
    ({'regions': ['us-east-1'], 'period': 300.0}, "collector_configs['period'] must be 60 or 300 seconds (got 300.0)"),
    ({'regions': ['us-east-1'], 'targets': [{'namespace': 'AWS/EC2', 'metrics': [' CPUUtilization']}]},
     "collector_configs['targets'][0]['metrics'][0] ' CPUUtilization' has a space at its start or end"),
    ({'regions': ['us-east-1'], 'targets': [{'namespace': 'AWS/EC2', 'metrics': ['ALL']}]},
     "collector_configs['targets'][0]['metrics'][0] 'ALL' names no metric: for every metric write 'ALL' (not in a list)"),
    ({'regions': ['us-east-1'], 'targets': [{'namespace': 'AWS/EC2', 'metrics': ['not', 'CPU*']}]},
     "collector_configs['targets'][0]['metrics'][0] 'not': write 'NOT' in capitals"),
    ({'regions': ['us-east-1'], 'targets': [{'namespace': 'AWS/EC2', 'dimensions': ['all']}]},
     "collector_configs['targets'][0]['dimensions'][0] 'all' names no dimension"),
    ({'regions': ['us-east-1'], 'targets': [{'namespace': 'AWS/EC2', 'dimensions': ['InstanceId', 'InstanceId ']}]},
     "collector_configs['targets'][0]['dimensions'][1] 'InstanceId ' has a space at its start or end"),
    ({'regions': ['us-east-1'], 'targets': [{'namespace': 'aws/ec2'}]},
     "collector_configs['targets'][0]['namespace'] 'aws/ec2' matches no metric: CloudWatch namespaces are case-sensitive; did you mean 'AWS/EC2'?"),
    # Two exact dimension sets in one namespace narrow one another to nothing.
    ({'regions': ['us-east-1'], 'targets': [
        {'namespace': 'AWS/EC2', 'metrics': ['CPUUtilization']},
        {'namespace': 'AWS/EC2', 'metrics': ['CPUUtilization'], 'dimensions': ['AutoScalingGroupName']}]},
     "collector_configs['targets'][1] keeps the series with the dimensions ['AutoScalingGroupName'] and "
     "collector_configs['targets'][0] those with ['InstanceId'] (the default for AWS/EC2): targets of one "
     'namespace narrow one another (a series must pass each), so together they keep nothing; give them '
     "the same 'dimensions', or 'ALL' to one of them"),
    ({'regions': ['us-east-1'], 'targets': [{'namespace': 'AWS\uff0fEC2'}]},
     "collector_configs['targets'][0]['namespace'] must be a CloudWatch namespace such as 'AWS/EC2' "
     "(got 'AWS\uff0fEC2')"),
]


@pytest.mark.parametrize('configs,expected', BAD, ids=[e for _, e in BAD])
def test_a_bad_option_is_one_clear_line(configs, expected):
    with pytest.raises(core.ConfigError) as info:
        cw.DataCollector({'ak_id': 'AKIAEXAMPLEEXAMPLE01', 'ak_secret': 'x' * 40}, configs)
    assert expected in str(info.value) and '\n' not in str(info.value)


def test_extra_tags_may_not_name_a_dimension_the_collector_writes():
    """A series' dimensions are its tags: extra_tags['InstanceId'] would be
    lost on every point. A target of any dimensions (AWS/S3) names none."""
    account = {'ak_id': 'AKIAEXAMPLEEXAMPLE01', 'ak_secret': 'x' * 40, 'extra_tags': {'InstanceId': 'mine'}}
    with pytest.raises(core.ConfigError) as info:
        cw.DataCollector(account, {'regions': ['us-east-1']})
    assert str(info.value) == ("account['extra_tags']['InstanceId'] would overwrite the tag the "
                               'AWS CloudWatch collector sets itself: rename the key')
    with pytest.raises(core.ConfigError) as info:
        cw.DataCollector(dict(account, extra_tags={'DBInstanceIdentifier': 'x'}),
                         {'regions': ['us-east-1'], 'targets': [{'namespace': 'AWS/RDS'}]})
    assert str(info.value) == ("account['extra_tags']['DBInstanceIdentifier'] would overwrite the tag "
                               'the AWS CloudWatch collector sets itself: rename the key')
    s3 = cw.DataCollector(account, {'regions': ['us-east-1'], 'targets': [{'namespace': 'AWS/S3'}]})
    assert s3.extra_tags == {'InstanceId': 'mine'}


def test_metric_patterns_not_and_narrowing_targets():
    configs = cw.validate_configs({'regions': ['us-east-1'], 'targets': [
        {'namespace': 'AWS/EC2', 'metrics': ['CPU*', '*Packets*']},
        {'namespace': 'AWS/EC2', 'metrics': ['NOT', 'CPUCredit*', 'NetworkPacketsOut']}]})
    targets = configs['targets']
    names = ['CPUUtilization', 'CPUCreditUsage', 'NetworkPacketsIn', 'NetworkPacketsOut', 'NetworkIn']
    dims = (('InstanceId', 'i-1'),)
    kept = [n for n in names if all(cw._matches(t, n, dims) for t in targets)]
    assert kept == ['CPUUtilization', 'NetworkPacketsIn']
    # The default dimension set is exact: a series with one more dimension is not one instance's.
    assert not cw._matches(targets[0], 'CPUUtilization', (('ImageId', 'ami-1'), ('InstanceId', 'i-1')))
    everything = cw.validate_configs({'regions': ['us-east-1'], 'targets': [
        {'namespace': 'AWS/EC2', 'metrics': 'ALL', 'dimensions': 'ALL'}]})['targets'][0]
    assert cw._matches(everything, 'AnyMetric', (('AutoScalingGroupName', 'asg'),))
    defaults = cw.validate_configs({'regions': ['us-east-1']})
    assert defaults['delay'] == 600 and defaults['statistics'] == list(cw.STATISTICS)
    assert cw.validate_configs({'regions': ['us-east-1'], 'period': 60})['delay'] == 180


# -- values on moto, every auth method -------------------------------------------

@pytest.fixture
def estate(aws):
    """Two instances in us-east-1 with CPU data in the four buckets before END,
    and NetworkIn only in one of them: a statistic without data is absent."""
    ids = aws.run_instances('us-east-1', 2, name=unique('cw'))
    for n, instance_id in enumerate(ids):
        for back in range(1, 5):
            bucket = END - back * PERIOD
            put(aws, 'us-east-1', instance_id, 'CPUUtilization', bucket + 10, 10.0 * (n + 1) + back)
            put(aws, 'us-east-1', instance_id, 'CPUUtilization', bucket + 70, 20.0 * (n + 1) + back)
    put(aws, 'us-east-1', ids[0], 'NetworkIn', END - PERIOD + 5, 1234.0)
    return ids


def accounts(aws, user):
    """The four methods of the user's page (MFA with a role), as account dicts."""
    role = aws.make_role(unique('reader'), user['arn'], 'aws', external_id='ext-123456')
    serial = aws.make_mfa_device(user['arn'].split('/')[-1], 'aws')
    return {
        'keys': account_of(user),
        'role': account_of(user, assume_role_arn=role, external_id='ext-123456'),
        'mfa_role': account_of(user, assume_role_arn=role, external_id='ext-123456',
                               serial_number=serial, token_code='123456'),
        'instance_role': {'extra_tags': {'account_name': 'role for ec2'}},
    }


@pytest.mark.parametrize('method', ['keys', 'role', 'mfa_role', 'instance_role'])
def test_every_auth_method_collects_the_buckets_with_their_values(aws, user, estate, sink,
                                                                   monkeypatch, method):
    account = accounts(aws, user)[method]
    imds = None
    if method == 'instance_role':
        instance_role = aws.make_role(unique('instance'), user['arn'], 'aws')
        imds = ImdsServer(aws.assume(instance_role, user, 'us-east-1')).start()
        monkeypatch.setenv('AWS_EC2_METADATA_SERVICE_ENDPOINT', imds.url)
    try:
        collector = cw.DataCollector(account, {'regions': ['us-east-1']}, now=lambda: NOW)
        core.Runner(collector, force=True).run()
    finally:
        if imds:
            imds.stop()
    points = by_series(p for p in sink.metrics() if p['tags']['InstanceId'] in estate)
    # The first run reads the last closed bucket and re-reads two before it.
    assert sorted({t for _, _, t in points}) == [END - 3 * PERIOD, END - 2 * PERIOD, END - PERIOD]
    first = points[(estate[0], 'CPUUtilization', END - PERIOD)]
    assert first['measurement'] == 'aws_AWS/EC2'
    assert first['fields'] == {'CPUUtilization_Average': 16.0, 'CPUUtilization_Maximum': 21.0,
                               'CPUUtilization_Minimum': 11.0, 'CPUUtilization_SampleCount': 2.0,
                               'CPUUtilization_Sum': 32.0}
    assert points[(estate[1], 'CPUUtilization', END - 3 * PERIOD)]['fields']['CPUUtilization_Sum'] == 66.0
    assert first['timestamp'] == (END - PERIOD) * 10**9
    assert first['tags']['RegionId'] == 'us-east-1' and first['tags']['cloud_provider'] == 'AWS'
    assert points[(estate[0], 'NetworkIn', END - PERIOD)]['fields']['NetworkIn_Sum'] == 1234.0
    # NetworkIn has data in one bucket only: the others are not written, not zero.
    assert [t for i, m, t in points if m == 'NetworkIn'] == [END - PERIOD]
    assert all(isinstance(v, float) and not math.isnan(v) for p in points.values()
               for v in p['fields'].values())
    if method == 'instance_role':
        assert first['tags']['account_name'] == 'role for ec2'


# -- across runs: late data, a bucket boundary, missed runs ------------------------

def run_at(account, now, configs=None, **kwargs):
    collector = cw.DataCollector(account, dict({'regions': ['us-east-1']}, **(configs or {})),
                                 now=lambda: now)
    summary = core.Runner(collector, force=True, **kwargs).run()
    return summary['collectors'][0]['regions'][0]


def test_each_bucket_is_written_once_and_late_data_is_caught(aws, user, estate, sink):
    account = account_of(user)
    first = run_at(account, NOW)
    assert first['calls'] == {'ListMetrics': 1, 'GetMetricData': 1}
    written_first = by_series(p for p in sink.metrics() if p['tags']['InstanceId'] in estate)
    # After the first run: a late datapoint for a bucket it found empty, and
    # the next bucket (it closes during the next 5 minutes).
    put(aws, 'us-east-1', estate[0], 'NetworkIn', END - 2 * PERIOD + 5, 99.0)
    for instance_id in estate:
        put(aws, 'us-east-1', instance_id, 'CPUUtilization', END + 5, 50.0)
    sink.points.clear()
    same_bucket = run_at(account, NOW + 120)            # no new bucket closed: no call
    assert same_bucket['calls'] == {} and same_bucket['points'] == 0
    assert 'no new bucket has closed since the last run' in same_bucket['summary']
    second = run_at(account, NOW + PERIOD)
    assert second['calls'] == {'GetMetricData': 1}, 'ListMetrics is cached'
    written_second = by_series(p for p in sink.metrics() if p['tags']['InstanceId'] in estate)
    assert set(written_second) == {(estate[0], 'NetworkIn', END - 2 * PERIOD),
                                   (estate[0], 'CPUUtilization', END),
                                   (estate[1], 'CPUUtilization', END)}
    assert not set(written_first) & set(written_second), 'a bucket written twice'
    assert written_second[(estate[0], 'NetworkIn', END - 2 * PERIOD)]['fields']['NetworkIn_Sum'] == 99.0


def test_no_gap_after_missed_runs_up_to_the_backfill(aws, user, estate, sink):
    account = account_of(user)
    put(aws, 'us-east-1', estate[1], 'DiskReadOps', END - 5 * PERIOD, 1.0)   # an older bucket
    run_at(account, NOW)
    missed = 10                                          # ten buckets without a run
    for back in range(missed + 1):
        put(aws, 'us-east-1', estate[1], 'DiskReadOps', END + back * PERIOD + 1, float(back))
    sink.points.clear()
    run_at(account, NOW + (missed + 1) * PERIOD)
    disk = sorted(t for i, m, t in by_series(sink.metrics()) if m == 'DiskReadOps' and i == estate[1])
    assert disk == [END + back * PERIOD for back in range(missed + 1)]


def test_a_bucket_is_not_written_again_when_the_record_is_lost_only_within_the_reread(aws, user,
                                                                                     estate, sink):
    """The record of written buckets is what makes a re-read harmless: with it,
    re-running the same window writes nothing; without it (a new cache), the
    window is written again, which is why the record is kept in DFF.CACHE."""
    account = account_of(user)
    run_at(account, NOW)
    count = len(sink.metrics())
    assert count and run_at(account, NOW)['points'] == 0


def cpu_buckets(sink, instance_id):
    return [p['timestamp'] // 10**9 for p in sink.metrics()
            if p['tags'].get('InstanceId') == instance_id and 'CPUUtilization_Sum' in p['fields']]


def test_failed_getmetricdata_runs_leave_no_gap(aws, user, sink, monkeypatch):
    """Three runs whose GetMetricData fails must lose nothing, as three
    missed runs lose nothing: the record keeps where the missing buckets begin."""
    (instance_id,) = aws.run_instances('us-east-1', 1, name=unique('gap'))
    for k in range(-4, 6):
        put(aws, 'us-east-1', instance_id, 'CPUUtilization', END + k * PERIOD + 5, 1.0 + k)
    account = account_of(user)
    run_at(account, NOW, {'max_attempts': 1})
    down = {'on': True}
    proxy = FaultProxy(aws.url, lambda r: ('status', 503, 'unavailable')
                       if down['on'] and b'MetricDataQueries' in r['body'] else None)
    monkeypatch.setenv('AWS_ENDPOINT_URL', proxy.url)
    try:
        for k in (1, 2, 3):
            with pytest.raises(core.RunFailed):
                run_at(account, NOW + k * PERIOD, {'max_attempts': 1})
        down['on'] = False
        # No new bucket since the last (failed) run: the failed ones are read all the same.
        run_at(account, NOW + 3 * PERIOD + 60, {'max_attempts': 1})
        run_at(account, NOW + 4 * PERIOD, {'max_attempts': 1})
    finally:
        proxy.stop()
    got = cpu_buckets(sink, instance_id)
    assert sorted(got) == [END + k * PERIOD for k in range(-3, 4)] and len(got) == len(set(got))


def test_a_failed_run_after_two_hours_of_missed_runs_leaves_no_gap_at_period_60(aws, user, sink,
                                                                                  monkeypatch):
    """Func down 2 h, its first run back failing: the failed run must not move
    the missing buckets past the 63 buckets the record's masks reach."""
    p = 60
    now0 = 1_800_000_000 // p * p + 7
    end0 = (now0 - 180) // p * p
    (instance_id,) = aws.run_instances('us-east-1', 1, name=unique('horizon'))
    for k in range(-3, 125):
        put(aws, 'us-east-1', instance_id, 'CPUUtilization', end0 + k * p + 5, 1.0)
    account = account_of(user)
    configs = {'period': 60, 'max_attempts': 1, 'statistics': ['Sum']}
    run_at(account, now0, configs)
    down = {'on': True}
    proxy = FaultProxy(aws.url, lambda r: ('status', 503, 'unavailable')
                       if down['on'] and b'MetricDataQueries' in r['body'] else None)
    monkeypatch.setenv('AWS_ENDPOINT_URL', proxy.url)
    try:
        with pytest.raises(core.RunFailed):
            run_at(account, now0 + 120 * p, configs)
        down['on'] = False
        run_at(account, now0 + 121 * p, configs)
        run_at(account, now0 + 122 * p, configs)
    finally:
        proxy.stop()
    got = cpu_buckets(sink, instance_id)
    assert sorted(got) == list(range(end0 - 3 * p, end0 + 122 * p, p)) and len(got) == len(set(got))


def test_the_record_outlives_an_upgrade_and_equivalent_spellings(aws, user, sink):
    """The record kept under the key of the version before (state_key) is
    taken over; the key does not change with the statistics, 'ALL' or ['*'],
    a default written out, or an Organization's account lists."""
    (instance_id,) = aws.run_instances('us-east-1', 1, name=unique('upgrade'))
    for k in range(-4, 2):
        put(aws, 'us-east-1', instance_id, 'CPUUtilization', END + k * PERIOD + 5, 1.0)
    account = account_of(user)
    run_at(account, NOW)
    collector = cw.DataCollector(account, {'regions': ['us-east-1']}, now=lambda: NOW + PERIOD)
    cache, account_id = collector.cache_store(), collector.identity()['account_id']
    new, old = (f'integration_aws_cloudwatch:written:{scope}:{account_id}:us-east-1'
                for scope in (collector.record_scope, collector.state_key))
    cache.set(old, cache.get(new), expires=3600)
    cache.delete(new)
    core.Runner(collector, force=True).run()
    got = cpu_buckets(sink, instance_id)
    assert sorted(got) == [END + k * PERIOD for k in range(-3, 1)] and len(got) == len(set(got))

    def scope(account_extra=None, **configs):
        return cw.DataCollector(dict(account, **(account_extra or {})),
                                dict({'regions': ['us-east-1']}, **configs)).record_scope
    assert scope(statistics=['Sum', 'Average']) == scope(statistics=['Average', 'Sum'])
    assert scope(targets=[{'namespace': 'AWS/RDS', 'metrics': 'ALL'}]) == \
        scope(targets=[{'namespace': 'AWS/RDS', 'metrics': ['*'], 'dimensions': ['DBInstanceIdentifier']}])
    org = {'member_role_name': 'Reader'}
    assert scope(dict(org, member_accounts=['111111111111'])) == \
        scope(dict(org, member_accounts=['111111111111', '222222222222'], exclude_accounts=['333333333333']))
    assert scope(statistics=['Sum']) == scope(statistics=['Sum', 'Average'])
    assert scope(period=60) != scope(period=300)
    assert scope(targets=[{'namespace': 'AWS/EC2', 'metrics': ['CPU*']}]) != scope()


def test_two_runs_failing_on_different_calls_write_each_bucket_once(aws, user, sink, monkeypatch):
    """101 series x 5 statistics: two GetMetricData calls. After 70 minutes
    down, the first run back fails on the second call, the next on the first:
    each series' own missing buckets are read back, none twice (period 60:
    beyond the 63 buckets the masks reach)."""
    p = 60
    now0 = 1_800_000_000 // p * p + 7
    end0 = (now0 - 180) // p * p
    clock = {'now': now0}
    estate = ec2_estate(instances=101, metrics=1, region='us-east-1')
    fake = FakeCloudWatch(estate, period=60, clock=lambda: clock['now']).start()
    ids = sorted(s['dimensions']['InstanceId'] for s in estate['us-east-1'])
    fail = {'id': None}
    proxy = FaultProxy(fake.url, lambda r: ('status', 503, 'unavailable')
                       if fail['id'] and fail['id'].encode() in r['body'] else None)
    monkeypatch.setenv('AWS_ENDPOINT_URL_CLOUDWATCH', proxy.url)
    account, configs = account_of(user), {'period': 60, 'max_attempts': 1}

    def run(now):
        clock['now'] = now
        return run_at(account, now, configs)
    try:
        run(now0)
        for failing, minute in ((ids[-1], 70), (ids[0], 71)):
            fail['id'] = failing
            with pytest.raises(core.RunFailed):
                run(now0 + minute * p)
        fail['id'] = None
        run(now0 + 72 * p)
        run(now0 + 73 * p)
    finally:
        proxy.stop()
        fake.stop()
    for instance in (ids[0], ids[-1]):
        got = [pt['timestamp'] // 10**9 for pt in sink.metrics() if pt['tags'].get('InstanceId') == instance]
        assert sorted(got) == list(range(end0 - 3 * p, end0 + 73 * p, p)), instance


def test_a_rotated_key_or_a_clock_that_came_back_keeps_collecting(aws, user, sink, caplog):
    """The record belongs to the account, not to the key that reached it. A
    clock that jumped a day ahead and came back: the record it left is
    started again (one warning), not believed until it expires."""
    (instance_id,) = aws.run_instances('us-east-1', 1, name=unique('rotate'))
    for k in range(-4, 12):
        put(aws, 'us-east-1', instance_id, 'CPUUtilization', END + k * PERIOD + 5, 1.0)
    run_at(account_of(user), NOW)
    key = aws.client('iam', 'us-east-1').create_access_key(
        UserName=user['arn'].split('/')[-1])['AccessKey']
    rotated = {'ak_id': key['AccessKeyId'], 'ak_secret': key['SecretAccessKey']}
    run_at(rotated, NOW + PERIOD)
    got = cpu_buckets(sink, instance_id)
    assert sorted(got) == [END + k * PERIOD for k in range(-3, 1)] and len(got) == len(set(got))
    sink.points.clear()
    run_at(rotated, NOW + 86400)                    # a clock a day ahead, by mistake
    for k in range(2, 11):
        run_at(rotated, NOW + k * PERIOD)
    # Started again, its first window re-reads two buckets written before the
    # clock jumped (README: a record ahead of the clock is started again).
    assert sorted(cpu_buckets(sink, instance_id)) == [END + k * PERIOD for k in range(-1, 10)]
    assert sum('ahead of this clock: starting it again' in r.getMessage() for r in caplog.records) == 1


def test_changing_a_tuning_option_or_adding_a_region_writes_no_bucket_twice(aws, user, sink):
    (instance_id,) = aws.run_instances('us-east-1', 1, name=unique('dup'))
    for k in range(-4, 2):
        put(aws, 'us-east-1', instance_id, 'CPUUtilization', END + k * PERIOD + 5, 1.0)
    account = account_of(user)
    run_at(account, NOW, {'concurrency': 4})
    run_at(account, NOW + PERIOD, {'concurrency': 8, 'max_attempts': 5, 'delay': 600, 'backfill': 7200,
                                   'regions': ['us-east-1', 'us-west-2']})
    got = cpu_buckets(sink, instance_id)
    assert sorted(got) == [END + k * PERIOD for k in range(-3, 1)] and len(got) == len(set(got))


def test_a_series_found_by_a_later_listmetrics_gets_its_earlier_buckets(aws, user, sink):
    """A new instance is found when the ListMetrics answer is asked again (up
    to discovery_interval later): its buckets from before are written too."""
    (old,) = aws.run_instances('us-east-1', 1, name=unique('old'))
    put(aws, 'us-east-1', old, 'CPUUtilization', END - PERIOD + 5, 1.0)
    account = account_of(user)
    run_at(account, NOW)                                    # finds only the old one
    (new,) = aws.run_instances('us-east-1', 1, name=unique('new'))
    for k in range(11):
        put(aws, 'us-east-1', new, 'CPUUtilization', END + k * PERIOD + 5, 1.0)
        put(aws, 'us-east-1', old, 'CPUUtilization', END + k * PERIOD + 5, 2.0)
    for k in range(1, 10):                                  # the ListMetrics answer still kept
        assert run_at(account, NOW + k * PERIOD)['calls'] == {'GetMetricData': 1}
    assert cpu_buckets(sink, new) == []
    collector = cw.DataCollector(account, {'regions': ['us-east-1']}, now=lambda: NOW + 11 * PERIOD)
    collector.cache_store().delete(f"integration_aws_cloudwatch:series:{collector.record_scope}:"
                                   f"{collector.identity()['account_id']}:us-east-1")
    region = core.Runner(collector, force=True).run()['collectors'][0]['regions'][0]
    assert region['calls'] == {'ListMetrics': 1, 'GetMetricData': 2}     # the new one on its own
    assert sorted(cpu_buckets(sink, new)) == [END + k * PERIOD for k in range(11)]
    got = cpu_buckets(sink, old)
    assert sorted(got) == [END + k * PERIOD for k in range(-1, 11)] and len(got) == len(set(got))


def test_a_target_of_any_dimensions_still_links_its_instances(aws, user, sink):
    name = unique('link')
    (instance_id,) = aws.run_instances('us-east-1', 1, name=name)
    put(aws, 'us-east-1', instance_id, 'CPUUtilization', END - PERIOD + 5, 1.0)
    account = account_of(user)
    core.Runner([ec2.DataCollector(account, {'regions': ['us-east-1']}),
                 cw.DataCollector(account, {'regions': ['us-east-1'], 'targets': [
                     {'namespace': 'AWS/EC2', 'metrics': ['CPUUtilization'], 'dimensions': 'ALL'}]},
                     now=lambda: NOW)], force=True).run()
    mine = [p for p in sink.metrics() if p['tags'].get('InstanceId') == instance_id]
    assert len(mine) == 1 and mine[0]['tags']['InstanceName'] == name


def test_a_dimension_named_like_a_tag_we_write_keeps_its_series_apart(aws, user, sink, influx):
    namespace = unique('App')
    for zone, value in (('eu-zone-a', 10.0), ('eu-zone-b', 20.0)):
        aws.client('cloudwatch', 'us-east-1').put_metric_data(Namespace=namespace, MetricData=[{
            'MetricName': 'Lat', 'Dimensions': [{'Name': 'RegionId', 'Value': zone}],
            'Timestamp': datetime.datetime.fromtimestamp(END - PERIOD + 5, datetime.timezone.utc),
            'Value': value}])
    run_at(account_of(user), NOW, {'targets': [{'namespace': namespace, 'metrics': 'ALL'}],
                                   'statistics': ['Sum']})
    points = [p for p in sink.metrics() if p['measurement'] == 'aws_' + namespace]
    assert sorted((p['tags']['RegionId_dimension'], p['tags']['RegionId']) for p in points) == [
        ('eu-zone-a', 'us-east-1'), ('eu-zone-b', 'us-east-1')]
    status, error = influx.write('\n'.join(core.to_line_protocol(p) for p in points))
    assert status == 204, error
    assert sorted(r['Lat_Sum'] for r in influx.rows('aws_' + namespace)) == [10.0, 20.0]


# -- limits, pages and throttling on the fake CloudWatch ---------------------------

@pytest.fixture
def fake(monkeypatch):
    estate = ec2_estate(instances=300, metrics=14, region='us-east-1')
    server = FakeCloudWatch(estate, page_datapoints=700, throttle_every=7,
                            clock=lambda: NOW).start()
    monkeypatch.setenv('AWS_ENDPOINT_URL_CLOUDWATCH', server.url)
    yield server
    server.stop()


def test_500_queries_a_call_every_page_followed_throttling_absorbed(aws, user, fake, sink):
    region = run_at(account_of(user), NOW, configs={'concurrency': 3})
    fake.assert_clean()                                  # no 501-query call, no page dropped
    gmd = [c for c in fake.calls if c['operation'] == 'GetMetricData' and c['status'] == 200]
    assert max(c['queries'] for c in gmd) <= 500
    series = fake.series('us-east-1')
    assert region['series'] == len(series) == 300 * 14
    queries = len(series) * 5
    first_pages = [c for c in gmd if not c['next_token_in']]
    assert len(first_pages) == math.ceil(queries / 500)
    assert any(c['next_token_in'] for c in gmd), 'the test needs continuation pages'
    assert fake.throttled > 0
    # Every bucket of every series, once, with the fake's values.
    points = by_series(sink.metrics())
    buckets = [END - 3 * PERIOD, END - 2 * PERIOD, END - PERIOD]
    assert len(points) == len(series) * len(buckets)
    for s in series[::97]:
        for bucket in buckets:
            fields = points[(s['dimensions']['InstanceId'], s['metric'], bucket)]['fields']
            for stat in cw.STATISTICS:
                assert fields[f"{s['metric']}_{stat}"] == expected_value(s, stat, bucket, PERIOD)
    assert region['api_calls'] == len(fake.calls) - len([c for c in fake.calls
                                                         if c['operation'] == 'GetCallerIdentity'])


def test_all_statistics_of_a_series_share_a_call(aws, user, fake, sink):
    run_at(account_of(user), NOW, configs={'statistics': ['Average', 'Maximum', 'Sum']})
    fake.assert_clean()
    gmd = [c for c in fake.calls if c['operation'] == 'GetMetricData' and not c['next_token_in']
           and c['status'] == 200]
    assert all(c['queries'] % 3 == 0 and c['queries'] <= 500 for c in gmd)


# -- the line protocol through a real InfluxDB -------------------------------------

def test_metric_points_round_trip_through_influxdb(aws, user, estate, sink, influx):
    run_at(account_of(user), NOW)
    points = [p for p in sink.metrics() if p['tags']['InstanceId'] in estate]
    status, error = influx.write('\n'.join(core.to_line_protocol(p) for p in points))
    assert status == 204, error
    rows = influx.rows('aws_AWS/EC2')
    mine = [r for r in rows if r['InstanceId'] in estate]
    # Two series of one instance and bucket (CPU, NetworkIn) share tags and
    # time: InfluxDB, like DataKit, keeps one row with both fields.
    assert len(mine) == len({(p['tags']['InstanceId'], p['timestamp']) for p in points})
    assert sum(1 for r in mine for k, v in r.items() if k.endswith('_Sum') and v is not None) == len(points)
    row = next(r for r in mine if r['InstanceId'] == estate[0] and r['time'] == (END - PERIOD) * 10**9
               and r.get('CPUUtilization_Average') is not None)
    assert row['CPUUtilization_Average'] == 16.0 and row['RegionId'] == 'us-east-1'


# -- linkage to the EC2 objects ----------------------------------------------------

def test_metrics_carry_their_instances_tags_also_when_ec2_skips(aws, user, estate, sink, caplog):
    caplog.set_level('INFO', logger='integration')
    account = account_of(user, extra_tags={'team': 'web'})

    def runner(now):
        return core.Runner([ec2.DataCollector(account, {'regions': ['us-east-1']}),
                            cw.DataCollector(account, {'regions': ['us-east-1']}, now=lambda: now)],
                           clock=lambda: now)
    runner(NOW).run()
    first = [p for p in sink.metrics() if p['tags']['InstanceId'] == estate[0]]
    instance = next(p for c, p in sink.points if c == 'custom_object' and p['tags']['name'] == estate[0])
    expected = {k: v for k, v in instance['tags'].items() if k != 'name'}
    assert first and all(p['tags'] == {**expected, **{'InstanceId': estate[0]}} for p in first)
    assert 'name' not in first[0]['tags'] and first[0]['tags']['InstanceName'].startswith('cw-')
    # Five minutes later EC2 skips (fresh for 15 minutes); the metrics still link.
    for instance_id in estate:
        put(aws, 'us-east-1', instance_id, 'CPUUtilization', END + 5, 50.0)
    sink.points.clear()
    summary = runner(NOW + PERIOD).run()
    assert summary['collectors'][0]['status'] == 'skipped'
    later = [p for p in sink.metrics() if p['tags']['InstanceId'] == estate[0]]
    assert later and all(p['tags']['InstanceName'] == expected['InstanceName'] for p in later)
    assert 'comes before' not in caplog.text


def test_a_metric_collector_before_an_object_collector_is_warned_once(aws, user, sink, caplog):
    caplog.set_level('INFO', logger='integration')
    account = account_of(user)
    core.Runner([cw.DataCollector(account, {'regions': ['us-east-1']}, now=lambda: NOW),
                 ec2.DataCollector(account, {'regions': ['us-east-1']})]).run()
    warnings = [r.getMessage() for r in caplog.records if 'comes before' in r.getMessage()]
    assert warnings == ['[Runner] collector #1 (AWS CloudWatch) comes before #2 (AWS EC2): metrics '
                        'can take object tags only from collectors before them; put metric '
                        'collectors last']


# -- check ---------------------------------------------------------------------------

def test_check_probes_the_cloudwatch_permissions(aws, user):
    allowed = cw.DataCollector(account_of(user), {'regions': ['us-east-1']}).check()
    assert allowed[0]['ok'] and 'cloudwatch:ListMetrics and cloudwatch:GetMetricData allowed' \
        in allowed[0]['reason']
    ec2_only = aws.make_user(unique('ec2only'), 'aws', policy={
        'Version': '2012-10-17', 'Statement': [{'Effect': 'Allow', 'Action': [
            'ec2:Describe*', 'sts:GetCallerIdentity'], 'Resource': '*'}]})
    denied = cw.DataCollector(account_of(ec2_only), {'regions': ['us-east-1']}).check()
    assert not denied[0]['ok'] and 'AccessDenied' in denied[0]['reason']


# -- the startup script ----------------------------------------------------------

def cli(*args):
    import subprocess
    import sys
    return subprocess.run([sys.executable, '-m', 'integration_core__runner', *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)


def test_the_combined_script_runs_and_check_covers_its_permissions(aws, seed_estate, write_script):
    from integration_local.emulator import put_demo_metrics
    put_demo_metrics(aws, 'cn-northwest-1', seed_estate['ids'])
    path = write_script('5_ec2_with_metrics.py', seed_estate)
    receiver = DataKitReceiver()
    try:
        result = cli('run', path, '--datakit', receiver.url)
        lines = receiver.lines
    finally:
        receiver.stop()
    assert result.returncode == 0, result.stdout + result.stderr
    metrics = [line for line in lines if line.startswith('aws_AWS/EC2,')]
    objects = [line for line in lines if line.startswith('aws_ec2,')]
    assert {i for i in seed_estate['ids'] if any(f'name={i}' in line for line in objects)} == set(seed_estate['ids'])
    for instance_id in seed_estate['ids']:
        mine = [line for line in metrics if f'InstanceId={instance_id}' in line]
        assert mine and all('InstanceName=seed-' in line and (
            'CPUUtilization_Average=' in line or 'NetworkIn_Average=' in line) for line in mine)
    assert '[#2 AWS CloudWatch] cn-northwest-1:' in result.stdout
    checked = cli('check', path)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert 'ec2:DescribeInstances allowed' in checked.stdout
    assert 'cloudwatch:ListMetrics and cloudwatch:GetMetricData allowed' in checked.stdout
    with open(os.path.join(ROOT, 'scripts', '5_ec2_with_metrics.py')) as f:
        text = f.read()
    assert "fixed_crontab='*/5 * * * *'" in text and text.index('aws_ec2.DataCollector') < text.index(
        'aws_cloudwatch.DataCollector')


# -- what is recorded as written is what was delivered ------------------------------

def test_a_debug_run_leaves_the_buckets_to_the_next_run(aws, user, estate, sink):
    account = account_of(user)
    collector = cw.DataCollector(account, {'regions': ['us-east-1']}, now=lambda: NOW)
    summary = core.Runner(collector, debug=True, force=True).run()
    assert summary['points_collected'] > 0 and sink.points == []
    run_at(account, NOW)
    written = by_series(p for p in sink.metrics() if p['tags']['InstanceId'] in estate)
    assert (estate[0], 'CPUUtilization', END - PERIOD) in written


def test_a_run_cut_short_by_its_timeout_loses_no_bucket(aws, user, estate, sink, monkeypatch):
    """us-east-1 answers, us-west-2 hangs until the 3 s timeout: us-east-1's
    points were never delivered, so the next run must write them."""
    import integration_local.cli as local_cli
    from servers import FaultProxy
    hanging = FaultProxy(aws.url, lambda r: ('delay', 20) if r['region'] == 'us-west-2'
                         and r['service'] == 'monitoring' else None)
    try:
        monkeypatch.setenv('AWS_ENDPOINT_URL', hanging.url)
        account = account_of(user)
        collector = cw.DataCollector(account, {'regions': ['us-east-1', 'us-west-2']}, now=lambda: NOW)
        api = {'title': 'metrics', 'name': 'run', 'timeout': 3,
               'func': lambda: core.Runner(collector, force=True).run()}
        assert local_cli.run_api(api) == local_cli.EXIT_FAILED
    finally:
        hanging.stop()
    monkeypatch.setenv('AWS_ENDPOINT_URL', aws.url)
    run_at(account, NOW)
    written = by_series(p for p in sink.metrics() if p['tags']['InstanceId'] in estate)
    assert {(i, t) for i, m, t in written if m == 'CPUUtilization'} == {
        (i, END - b * PERIOD) for i in estate for b in (1, 2, 3)}


def test_metrics_keep_their_instances_tags_when_another_ec2_region_fails(aws, user, estate, sink, monkeypatch):
    """An EC2 region failing (or an Organization's account not collected this
    run) must not strip the tags of the other regions' metrics: the map of
    the regions collected is this run's, the others' stay as last kept."""
    from servers import FaultProxy, ec2_error
    failing = {'us-west-2'}
    proxy = FaultProxy(aws.url, lambda r: ('status', 403, ec2_error('UnauthorizedOperation', 'no'))
                       if r['action'] == 'DescribeInstances' and r['region'] in failing else None)
    monkeypatch.setenv('AWS_ENDPOINT_URL', proxy.url)
    (west,) = aws.run_instances('us-west-2', 1, name=unique('west'))
    put(aws, 'us-west-2', west, 'CPUUtilization', END - PERIOD + 5, 7.0)
    account = account_of(user)

    def run(now):
        sink.points.clear()
        try:
            core.Runner([ec2.DataCollector(account, {'regions': ['us-east-1', 'us-west-2'], 'max_attempts': 1}),
                         cw.DataCollector(account, {'regions': ['us-east-1', 'us-west-2']}, now=lambda: now)],
                        force=True).run()
            assert not failing
        except core.RunFailed:
            assert failing
        return {p['tags']['InstanceId']: p['tags'] for p in sink.metrics()}
    try:
        tags = run(NOW)
        assert tags[estate[0]]['InstanceName'].startswith('cw-')      # us-east-1: collected
        assert 'InstanceName' not in tags[west]                        # never collected yet
        # us-west-2 collected once, then failing again: its instances keep the
        # tags of the last map, us-east-1's are this run's.
        failing.clear()
        run(NOW)
        failing.add('us-west-2')
        for instance_id in estate + [west]:
            put(aws, 'us-east-1' if instance_id in estate else 'us-west-2', instance_id,
                'CPUUtilization', END + 5, 50.0)
        tags = run(NOW + PERIOD)
        assert tags[estate[0]]['InstanceName'].startswith('cw-')
        assert tags[west]['InstanceName'].startswith('west-') and tags[west]['RegionId'] == 'us-west-2'
    finally:
        proxy.stop()


def test_a_collection_stopped_part_way_keeps_the_instances_it_did_not_read(aws, user, sink, monkeypatch):
    """A hook's bug stops EC2 after its first point, the other regions not
    read: they are failed regions (not regions of 0 instances), and their
    instances stay in the map for the metrics."""
    from servers import FaultProxy
    regions = ['us-east-1', 'us-west-2', 'eu-west-1']
    (first,) = aws.run_instances('us-east-1', 1, name=unique('first'))
    (west,) = aws.run_instances('us-west-2', 1, name=unique('west'))
    (europe,) = aws.run_instances('eu-west-1', 1, name=unique('eu'))
    slow = set()
    proxy = FaultProxy(aws.url, lambda r: ('delay', 3) if slow and r['action'] == 'DescribeInstances'
                       and r['region'] != 'us-east-1' else None)
    monkeypatch.setenv('AWS_ENDPOINT_URL', proxy.url)
    account = account_of(user)
    broken = set()

    def after_collect(point):
        return [point] if broken else point         # a bug: a list, not a point

    def runner(now):
        return core.Runner([ec2.DataCollector(account, {'regions': regions, 'concurrency': 1},
                                              after_collect=after_collect),
                            cw.DataCollector(account, {'regions': regions}, now=lambda: now)],
                           clock=lambda: now, force=True)
    try:
        runner(NOW).run()
        broken.add(1)
        slow.add(1)
        with pytest.raises(core.RunFailed) as failed:
            runner(NOW + 900).run()
    finally:
        proxy.stop()
    ec2_status = failed.value.summary['collectors'][0]
    assert ec2_status['error'].startswith('collection stopped')
    unread = [r for r in ec2_status['regions'] if r['region'] != 'us-east-1']
    assert unread and all(r['error'] == 'stopped: the run ended before this region was collected'
                          for r in unread), [(r['region'], r['error']) for r in unread]
    links = core.ObjectLinks([ec2.DataCollector(account, {'regions': regions, 'concurrency': 1},
                                                after_collect=after_collect),
                              cw.DataCollector(account, {'regions': regions})], core.current_dff(), now=NOW + 900)
    objects, _ = links._last()
    assert {first, west, europe} <= set(objects)
