"""The fake CloudWatch endpoint, driven by real boto3 clients in each wire
protocol botocore can speak to CloudWatch: it must enforce AWS's limits (500
queries, NextToken pages, throttling) so collector tests built on it can fail."""
import concurrent.futures
import datetime
import time

import boto3
import pytest
from botocore.exceptions import ClientError

from fake_cloudwatch import (EC2_METRICS, FakeCloudWatch, ec2_estate, expected_value,
                             write_cloudwatch_model)

PROTOCOLS = ['json', 'smithy-rpc-v2-cbor', 'query']
T0 = 1699999200                 # 2023-11-14T22:00:00Z, on the hour
LATER = T0 + 86400              # a "now" by which every test bucket is published


@pytest.fixture(autouse=True)
def credentials(monkeypatch):
    monkeypatch.setenv('AWS_ACCESS_KEY_ID', 'AKIAEXAMPLEFAKECW0001')
    monkeypatch.setenv('AWS_SECRET_ACCESS_KEY', 'fake-secret-not-checked')


@pytest.fixture
def start_fake():
    started = []

    def start(estate, **options):
        fake = FakeCloudWatch(estate, **options).start()
        fake.now = LATER
        started.append(fake)
        return fake
    yield start
    for fake in started:
        fake.stop()


@pytest.fixture
def client_for(tmp_path):
    """A boto3 client (credentials from the environment) on the fake, forced
    to one wire protocol; standard retry mode."""
    def make(fake, protocol, region='us-east-1', **config):
        config.setdefault('retries', {'mode': 'standard', 'total_max_attempts': 3})
        model_dir = tmp_path / f'model-{protocol}'
        write_cloudwatch_model(str(model_dir), protocol)
        import botocore.session
        from botocore.config import Config
        session = botocore.session.Session()
        session.set_config_variable('data_path', str(model_dir))
        return boto3.session.Session(botocore_session=session).client(
            'cloudwatch', region_name=region, endpoint_url=fake.url, config=Config(**config))
    return make


def at(seconds):
    return datetime.datetime.fromtimestamp(T0 + seconds, datetime.timezone.utc)


def query(n, series, stat='Average', period=300):
    return {'Id': f'q{n}', 'ReturnData': True, 'MetricStat': {
        'Metric': {'Namespace': series['namespace'], 'MetricName': series['metric'],
                   'Dimensions': [{'Name': k, 'Value': v} for k, v in series['dimensions'].items()]},
        'Period': period, 'Stat': stat}}


def error_of(excinfo):
    error = excinfo.value.response['Error']
    return error['Code'], error['Message'], excinfo.value.response['ResponseMetadata']['HTTPStatusCode']


# -- ListMetrics -----------------------------------------------------------------

@pytest.mark.parametrize('protocol', PROTOCOLS)
def test_list_metrics_pages_of_500(start_fake, client_for, protocol):
    fake = start_fake(ec2_estate(instances=100, metrics=12))
    client = client_for(fake, protocol)
    pages = list(client.get_paginator('list_metrics').paginate(Namespace='AWS/EC2'))
    assert [len(page['Metrics']) for page in pages] == [500, 500, 200]
    listed = {(m['MetricName'], m['Dimensions'][0]['Value']) for page in pages for m in page['Metrics']}
    assert listed == {(s['metric'], s['dimensions']['InstanceId']) for s in fake.series('us-east-1')}
    assert [(c['operation'], c['protocol'], c['next_token_in'], c['metrics_out']) for c in fake.calls] == [
        ('ListMetrics', protocol, False, 500), ('ListMetrics', protocol, True, 500),
        ('ListMetrics', protocol, True, 200)]
    fake.assert_clean()


def test_list_metrics_filters_as_aws_does(start_fake, client_for):
    estate = [
        {'namespace': 'AWS/EC2', 'metric': 'CPUUtilization', 'dimensions': {'InstanceId': 'i-a'}},
        {'namespace': 'AWS/EC2', 'metric': 'CPUUtilization',
         'dimensions': {'InstanceId': 'i-b', 'ImageId': 'ami-1'}},
        {'namespace': 'AWS/EC2', 'metric': 'NetworkIn', 'dimensions': {'InstanceId': 'i-a'},
         'active': False},
        {'namespace': 'AWS/EC2', 'metric': 'CPUUtilization', 'dimensions': {'AutoScalingGroupName': 'g'}},
        {'namespace': 'AWS/EBS', 'metric': 'VolumeReadOps', 'dimensions': {'VolumeId': 'vol-1'}},
    ]
    fake = start_fake(estate)
    client = client_for(fake, 'json')

    def listed(**filters):
        return sorted((m['MetricName'], tuple(d['Value'] for d in m['Dimensions']))
                      for m in client.list_metrics(**filters)['Metrics'])
    # A name-only dimension filter also matches series with more dimensions.
    assert listed(Namespace='AWS/EC2', Dimensions=[{'Name': 'InstanceId'}]) == [
        ('CPUUtilization', ('i-a',)), ('CPUUtilization', ('i-b', 'ami-1')), ('NetworkIn', ('i-a',))]
    assert listed(Dimensions=[{'Name': 'InstanceId', 'Value': 'i-a'}], MetricName='NetworkIn') == [
        ('NetworkIn', ('i-a',))]
    assert listed(Namespace='AWS/EBS') == [('VolumeReadOps', ('vol-1',))]
    assert len(listed(RecentlyActive='PT3H')) == 4
    with pytest.raises(ClientError) as excinfo:
        client.list_metrics(RecentlyActive='PT1H')
    assert error_of(excinfo)[0] == 'ValidationError'
    assert len(fake.violations) == 1 and 'recentlyActive' in fake.violations[0]


def test_region_comes_from_the_credential_scope(start_fake, client_for):
    estate = dict(ec2_estate(instances=2, metrics=3, region='us-east-1'))
    estate.update(ec2_estate(instances=5, metrics=3, region='cn-northwest-1'))
    fake = start_fake(estate)
    assert len(client_for(fake, 'json', region='cn-northwest-1').list_metrics()['Metrics']) == 15
    assert len(client_for(fake, 'query', region='us-east-1').list_metrics()['Metrics']) == 6
    assert client_for(fake, 'json', region='eu-west-1').list_metrics()['Metrics'] == []
    assert [c['region'] for c in fake.calls] == ['cn-northwest-1', 'us-east-1', 'eu-west-1']


def test_boto3_finds_it_through_aws_endpoint_url_cloudwatch(start_fake, monkeypatch):
    fake = start_fake(ec2_estate(instances=1, metrics=2))
    monkeypatch.setenv('AWS_ENDPOINT_URL_CLOUDWATCH', fake.url)
    client = boto3.session.Session().client('cloudwatch', region_name='us-east-1')
    assert len(client.list_metrics()['Metrics']) == 2
    assert fake.calls[0]['operation'] == 'ListMetrics'


# -- GetMetricData: limits ---------------------------------------------------------------

@pytest.mark.parametrize('protocol', PROTOCOLS)
def test_501_queries_are_refused_and_recorded(start_fake, client_for, protocol):
    fake = start_fake(ec2_estate(instances=40, metrics=13))
    client = client_for(fake, protocol)
    series = fake.series('us-east-1')
    ok = client.get_metric_data(MetricDataQueries=[query(n, s) for n, s in enumerate(series[:500])],
                                StartTime=at(0), EndTime=at(300))
    assert len(ok['MetricDataResults']) == 500
    assert fake.violations == []
    with pytest.raises(ClientError) as excinfo:
        client.get_metric_data(MetricDataQueries=[query(n, s) for n, s in enumerate(series[:501])],
                               StartTime=at(0), EndTime=at(300))
    assert error_of(excinfo) == (
        'ValidationError', 'The collection MetricDataQueries must not have a size greater than 500.', 400)
    assert fake.violations == [
        'GetMetricData: The collection MetricDataQueries must not have a size greater than 500.']
    assert [(c['queries'], c['status'], c['error']) for c in fake.calls] == [
        (500, 200, None), (501, 400, 'ValidationError')]
    with pytest.raises(AssertionError, match='greater than 500'):
        fake.assert_clean()


SERIES = {'namespace': 'AWS/EC2', 'metric': 'CPUUtilization', 'dimensions': {'InstanceId': 'i-1'}}
DETAILED = dict(SERIES, dimensions={'InstanceId': 'i-2'}, resolution=60)     # 1-minute data


@pytest.mark.parametrize('change, message', [
    (lambda q: q[0].update(Id='Q1'), "'Q1' for parameter MetricDataQueries.member.1.Id"),
    (lambda q: q[0].update(Id='1a'), "'1a' for parameter MetricDataQueries.member.1.Id"),
    (lambda q: q[1].update(Id='a-b'), "'a-b' for parameter MetricDataQueries.member.2.Id"),
    (lambda q: q[1].update(Id='q0'), 'not unique'),
    (lambda q: q[0]['MetricStat'].update(Period=90), 'MetricDataQueries.member.1.MetricStat.Period'),
    (lambda q: q[1]['MetricStat'].update(Stat='p99'), "'p99'"),
    (lambda q: q.append({'Id': 'e', 'Expression': 'q0 * 2'}), 'only MetricStat'),
])
def test_invalid_queries_are_refused(start_fake, client_for, change, message):
    fake = start_fake([SERIES])
    client = client_for(fake, 'json')
    queries = [query(0, SERIES), query(1, SERIES, stat='Maximum')]
    change(queries)
    with pytest.raises(ClientError) as excinfo:
        client.get_metric_data(MetricDataQueries=queries, StartTime=at(0), EndTime=at(600))
    code, text, status = error_of(excinfo)
    assert (code, status) == ('ValidationError', 400) and message in text
    assert len(fake.violations) == 1


def test_start_must_precede_end(start_fake, client_for):
    fake = start_fake([SERIES])
    with pytest.raises(ClientError) as excinfo:
        client_for(fake, 'query').get_metric_data(
            MetricDataQueries=[query(0, SERIES)], StartTime=at(600), EndTime=at(600))
    assert error_of(excinfo)[:2] == (
        'ValidationError', 'The parameter StartTime must be less than the parameter EndTime.')


# -- GetMetricData: values, alignment, pages ---------------------------------------------------

def test_buckets_sit_on_the_clock_and_end_is_exclusive(start_fake, client_for):
    fake = start_fake([SERIES, DETAILED])
    client = client_for(fake, 'json')
    # 22:07:30 -> 22:07 (rounded down to the minute) -> first 5-minute bucket 22:10.
    result = client.get_metric_data(MetricDataQueries=[query(0, SERIES)], StartTime=at(450),
                                    EndTime=at(1800), ScanBy='TimestampAscending')
    got = result['MetricDataResults'][0]
    assert [t.timestamp() - T0 for t in got['Timestamps']] == [600, 900, 1200, 1500]
    assert got['Values'] == [expected_value(SERIES, 'Average', T0 + s, 300) for s in (600, 900, 1200, 1500)]
    assert got['Label'] == 'CPUUtilization' and got['StatusCode'] == 'Complete'
    # 22:00:30 is rounded down to 22:00, which is a one-minute bucket.
    result = client.get_metric_data(MetricDataQueries=[query(0, DETAILED, stat='Sum', period=60)],
                                    StartTime=at(30), EndTime=at(180))
    got = result['MetricDataResults'][0]
    assert [t.timestamp() - T0 for t in got['Timestamps']] == [120, 60, 0]      # descending
    assert got['Values'] == [expected_value(DETAILED, 'Sum', T0 + s, 60) for s in (120, 60, 0)]


def test_basic_monitoring_at_one_minute_gives_a_point_every_five(start_fake, client_for):
    fake = start_fake([SERIES, DETAILED], period=300)
    queries = [query(0, SERIES, 'SampleCount', period=60), query(1, DETAILED, 'SampleCount', period=300)]
    results = client_for(fake, 'json').get_metric_data(
        MetricDataQueries=queries, StartTime=at(0), EndTime=at(900),
        ScanBy='TimestampAscending')['MetricDataResults']
    basic, detailed = results
    assert [t.timestamp() - T0 for t in basic['Timestamps']] == [0, 300, 600]
    assert basic['Values'] == [1, 1, 1] and detailed['Values'] == [5, 5, 5]
    assert expected_value(SERIES, 'Sum', T0 + 60, 60) is None


def test_the_five_statistics_are_consistent(start_fake, client_for):
    fake = start_fake([DETAILED])
    queries = [dict(query(0, DETAILED, stat=stat), Id=stat.lower())
               for stat in ('Average', 'Maximum', 'Minimum', 'SampleCount', 'Sum')]
    results = client_for(fake, 'smithy-rpc-v2-cbor').get_metric_data(
        MetricDataQueries=queries, StartTime=at(0), EndTime=at(300))['MetricDataResults']
    value = {r['Id']: r['Values'][0] for r in results}
    assert value['minimum'] == value['average'] - 1 and value['maximum'] == value['average'] + 1
    assert value['samplecount'] == 5 and value['sum'] == value['average'] * 5


@pytest.mark.parametrize('protocol, paging, scan', [
    ('json', 'series', 'TimestampDescending'), ('json', 'time', 'TimestampAscending'),
    ('smithy-rpc-v2-cbor', 'series', 'TimestampAscending'), ('query', 'time', 'TimestampDescending'),
    ('query', 'series', 'TimestampDescending')])
def test_paginator_gets_every_datapoint_once(start_fake, client_for, protocol, paging, scan):
    fake = start_fake(ec2_estate(instances=5, metrics=2), page_datapoints=7, paging=paging)
    client = client_for(fake, protocol)
    series = fake.series('us-east-1')
    absent = {'namespace': 'AWS/EC2', 'metric': 'CPUUtilization', 'dimensions': {'InstanceId': 'i-none'}}
    queries = [query(n, s, stat='Maximum') for n, s in enumerate(series)] + [query(10, absent)]
    first = client.get_metric_data(MetricDataQueries=queries, StartTime=at(0), EndTime=at(1800),
                                   ScanBy=scan)
    assert first['NextToken']
    assert 'PartialData' in {r['StatusCode'] for r in first['MetricDataResults']}
    assert sum(len(r['Values']) for r in first['MetricDataResults']) == 7

    got, statuses, pages = {}, {}, 0
    for page in client.get_paginator('get_metric_data').paginate(
            MetricDataQueries=queries, StartTime=at(0), EndTime=at(1800), ScanBy=scan):
        pages += 1
        assert sum(len(r['Values']) for r in page['MetricDataResults']) <= 7
        for result in page['MetricDataResults']:
            got.setdefault(result['Id'], []).extend(
                (t.timestamp() - T0, v) for t, v in zip(result['Timestamps'], result['Values']))
            statuses.setdefault(result['Id'], []).append(result['StatusCode'])
    assert pages == 9                   # 60 datapoints, 7 a page
    buckets = [0, 300, 600, 900, 1200, 1500]
    if scan == 'TimestampDescending':
        buckets.reverse()
    for n, s in enumerate(series):
        assert got[f'q{n}'] == [(b, expected_value(s, 'Maximum', T0 + b, 300)) for b in buckets]
        # Every page but a query's last one says there is more.
        assert set(statuses[f'q{n}'][:-1]) <= {'PartialData'} and statuses[f'q{n}'][-1] == 'Complete'
    assert got['q10'] == [] and statuses['q10'] == ['Complete']
    assert [c['next_token_in'] for c in fake.calls[1:]] == [False] + [True] * 8
    assert sum(c['datapoints_out'] for c in fake.calls[1:]) == 60
    fake.assert_clean()


def test_a_dropped_page_is_detected(start_fake, client_for):
    fake = start_fake(ec2_estate(instances=5, metrics=2), page_datapoints=7)
    series = fake.series('us-east-1')
    client_for(fake, 'json').get_metric_data(
        MetricDataQueries=[query(n, s) for n, s in enumerate(series)], StartTime=at(0), EndTime=at(1800))
    assert [op for op, _ in fake.unfollowed_tokens()] == ['GetMetricData']
    with pytest.raises(AssertionError, match='page never fetched'):
        fake.assert_clean()


def test_next_token_only_continues_its_own_request(start_fake, client_for):
    fake = start_fake([SERIES], page_datapoints=2)
    client = client_for(fake, 'json')
    token = client.get_metric_data(MetricDataQueries=[query(0, SERIES)], StartTime=at(0),
                                   EndTime=at(1800))['NextToken']
    with pytest.raises(ClientError) as excinfo:
        client.get_metric_data(MetricDataQueries=[query(0, SERIES)], StartTime=at(0),
                               EndTime=at(2100), NextToken=token)
    assert error_of(excinfo)[0] == 'InvalidNextToken'
    assert fake.violations and 'different request' in fake.violations[0]


def test_max_datapoints_lowers_the_page(start_fake, client_for):
    fake = start_fake([SERIES], page_datapoints=100)
    result = client_for(fake, 'query').get_metric_data(
        MetricDataQueries=[query(0, SERIES)], StartTime=at(0), EndTime=at(1800), MaxDatapoints=4)
    assert len(result['MetricDataResults'][0]['Values']) == 4 and result['NextToken']


# -- missing and late data, the clock ---------------------------------------------------

def test_missing_late_and_delayed_buckets_follow_the_clock(start_fake, client_for):
    series = dict(SERIES, missing=[T0 + 300], late={T0 + 600: T0 + 3600})
    fake = start_fake([series])
    client = client_for(fake, 'json')

    def buckets():
        result = client.get_metric_data(MetricDataQueries=[query(0, series)], StartTime=at(0),
                                        EndTime=at(1800), ScanBy='TimestampAscending')
        return [t.timestamp() - T0 for t in result['MetricDataResults'][0]['Timestamps']]
    fake.now = T0 + 1799            # 22:25 bucket still being filled: not served
    assert buckets() == [0, 900, 1200]
    fake.now = T0 + 1800
    assert buckets() == [0, 900, 1200, 1500]
    fake.now = datetime.datetime.fromtimestamp(T0 + 3600, datetime.timezone.utc)
    assert buckets() == [0, 600, 900, 1200, 1500]
    fake.delay = 600                # published 10 minutes after the bucket ends
    fake.now = T0 + 1800
    assert buckets() == [0, 900]


def test_values_callable_and_clock_callable(start_fake, client_for):
    clock = {'now': T0 + 7200}
    fake = start_fake([SERIES], values=lambda s, stat, t, p: None if t == T0 + 600 else 1.25,
                      late=lambda s, t, p: T0 + 9000 if t == T0 + 900 else None)
    fake.clock = lambda: clock['now']
    client = client_for(fake, 'json')
    result = client.get_metric_data(MetricDataQueries=[query(0, SERIES)], StartTime=at(0),
                                    EndTime=at(1200))['MetricDataResults'][0]
    assert [t.timestamp() - T0 for t in result['Timestamps']] == [300, 0]
    assert result['Values'] == [1.25, 1.25]
    clock['now'] = T0 + 9000
    result = client.get_metric_data(MetricDataQueries=[query(0, SERIES)], StartTime=at(0),
                                    EndTime=at(1200))['MetricDataResults'][0]
    assert [t.timestamp() - T0 for t in result['Timestamps']] == [900, 300, 0]


def test_later_pages_keep_the_clock_of_the_first(start_fake, client_for):
    fake = start_fake([SERIES], page_datapoints=2)
    client = client_for(fake, 'json')
    fake.now = T0 + 1200
    args = dict(MetricDataQueries=[query(0, SERIES)], StartTime=at(0), EndTime=at(1800))
    first = client.get_metric_data(**args)
    fake.now = LATER                # a bucket boundary passes between two pages
    second = client.get_metric_data(NextToken=first['NextToken'], **args)
    stamps = [t.timestamp() - T0 for r in (first, second) for t in r['MetricDataResults'][0]['Timestamps']]
    assert stamps == [900, 600, 300, 0] and 'NextToken' not in second


# -- GetMetricStatistics ------------------------------------------------------------------

@pytest.mark.parametrize('protocol', ['json', 'query'])
def test_get_metric_statistics(start_fake, client_for, protocol):
    fake = start_fake(ec2_estate(instances=1, metrics=1))
    series = fake.series('us-east-1')[0]
    client = client_for(fake, protocol)
    args = dict(Namespace='AWS/EC2', MetricName='CPUUtilization',
                Dimensions=[{'Name': 'InstanceId', 'Value': series['dimensions']['InstanceId']}],
                Period=300, Statistics=['Average', 'Maximum', 'SampleCount'])
    points = client.get_metric_statistics(StartTime=at(0), EndTime=at(3600), **args)['Datapoints']
    stamps = [p['Timestamp'].timestamp() - T0 for p in points]
    assert sorted(stamps) == list(range(0, 3600, 300))
    assert stamps not in (sorted(stamps), sorted(stamps, reverse=True))        # unordered
    for point in points:
        for stat in ('Average', 'Maximum', 'SampleCount'):
            assert point[stat] == expected_value(series, stat, point['Timestamp'], 300)
        assert point['Unit'] == 'Percent' and 'Sum' not in point
    with pytest.raises(ClientError) as excinfo:
        client.get_metric_statistics(StartTime=at(0), EndTime=at(1441 * 60), **dict(args, Period=60))
    assert error_of(excinfo)[0] == 'InvalidParameterCombination'
    assert [c['operation'] for c in fake.calls] == ['GetMetricStatistics'] * 2


# -- throttling, latency, recorder -------------------------------------------------------------

@pytest.mark.parametrize('protocol', PROTOCOLS)
def test_throttling_is_retried_by_botocore_and_counted(start_fake, client_for, protocol):
    fake = start_fake(ec2_estate(instances=1, metrics=3), throttle_every=2)
    client = client_for(fake, protocol)
    for _ in range(3):
        assert len(client.list_metrics()['Metrics']) == 3
    # Requests 2 and 4 were throttled; each retry succeeded.
    assert [(c['status'], c['error']) for c in fake.calls] == [
        (200, None), (400, 'Throttling'), (200, None), (400, 'Throttling'), (200, None)]
    assert fake.throttled == 2 and fake.violations == []
    single = client_for(fake, protocol, retries={'mode': 'standard', 'total_max_attempts': 1})
    with pytest.raises(ClientError) as excinfo:
        single.list_metrics()                   # request 6
    assert error_of(excinfo) == ('Throttling', 'Rate exceeded', 400)
    assert len(single.list_metrics()['Metrics']) == 3


def test_latency_overlaps_across_threads(start_fake, client_for):
    fake = start_fake([SERIES], latency=0.4)
    clients = [client_for(fake, 'json') for _ in range(5)]
    began = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(5) as pool:
        list(pool.map(lambda c: c.list_metrics(), clients))
    elapsed = time.monotonic() - began
    assert 0.4 <= elapsed < 1.5         # one after the other: 2 s
    assert len(fake.calls) == 5


def test_recorder_fields_and_reset(start_fake, client_for):
    fake = start_fake([SERIES])
    client_for(fake, 'json').get_metric_data(
        MetricDataQueries=[query(0, SERIES), query(1, SERIES, stat='Sum')],
        StartTime=at(0), EndTime=at(900))
    call = fake.calls[0]
    assert {k: call[k] for k in ('operation', 'region', 'protocol', 'queries', 'next_token_in',
                                 'next_token_out', 'datapoints_out', 'status', 'error')} == {
        'operation': 'GetMetricData', 'region': 'us-east-1', 'protocol': 'json', 'queries': 2,
        'next_token_in': False, 'next_token_out': False, 'datapoints_out': 6, 'status': 200,
        'error': None}
    assert abs(call['time'] - time.time()) < 60
    fake.reset()
    assert fake.calls == [] and fake.violations == [] and fake.unfollowed_tokens() == []


def test_ec2_estate():
    estate = ec2_estate(instances=3, metrics=17, region='eu-west-1')
    series = estate['eu-west-1']
    assert len(series) == 51 and [s['metric'] for s in series[:17]] == list(EC2_METRICS)
    assert len({s['dimensions']['InstanceId'] for s in series}) == 3
    other = ec2_estate(instances=3, metrics=1, region='us-east-1')['us-east-1']
    assert not {s['dimensions']['InstanceId'] for s in other} & {s['dimensions']['InstanceId'] for s in series}
    with pytest.raises(ValueError):
        ec2_estate(metrics=18)


def test_cbor_timestamps_written_as_botocore_writes_them():
    """The fake writes epoch ints straight; botocore's serializer, given the
    same instants as datetimes, must produce the same bytes."""
    import botocore.session
    from botocore.serialize import RpcV2CBORSerializer

    from fake_cloudwatch import _CBORWriter
    shape = botocore.session.Session().get_service_model('cloudwatch').operation_model(
        'GetMetricData').output_shape
    result = {'MetricDataResults': [{'Id': 'q0', 'Label': 'CPUUtilization', 'Timestamps': [T0 + 300, T0],
                                     'Values': [1.5, 2.25], 'StatusCode': 'Complete'}]}
    fast, reference = bytearray(), bytearray()
    _CBORWriter()._serialize_data_item(fast, result, shape)
    as_datetimes = {'MetricDataResults': [dict(result['MetricDataResults'][0],
                                               Timestamps=[at(300), at(0)])]}
    RpcV2CBORSerializer()._serialize_data_item(reference, as_datetimes, shape)
    assert bytes(fast) == bytes(reference)


def test_text_survives_every_protocol(start_fake, client_for):
    odd = {'namespace': 'Custom/App & Co', 'metric': 'p<99>', 'dimensions': {'Name': 'a&b "c" <d>'}}
    fake = start_fake([odd])
    for protocol in PROTOCOLS:
        client = client_for(fake, protocol)
        [metric] = client.list_metrics()['Metrics']
        assert metric == {'Namespace': odd['namespace'], 'MetricName': odd['metric'],
                          'Dimensions': [{'Name': 'Name', 'Value': odd['dimensions']['Name']}]}
        [result] = client.get_metric_data(MetricDataQueries=[dict(query(0, odd), Label='x & <y>')],
                                          StartTime=at(0), EndTime=at(300))['MetricDataResults']
        assert result['Label'] == 'x & <y>' and result['Values'] == [
            expected_value(odd, 'Average', T0, 300)]


def test_unreadable_and_unknown_requests_get_aws_shaped_errors(start_fake, client_for):
    import http.client
    import json
    fake = start_fake([SERIES])
    host = fake.url.split('//')[1]
    connection = http.client.HTTPConnection(host, timeout=5)
    connection.request('POST', '/', body=b'{not json', headers={
        'X-Amz-Target': 'GraniteServiceVersion20100801.ListMetrics',
        'Content-Type': 'application/x-amz-json-1.0'})
    response = connection.getresponse()
    body = json.loads(response.read())
    assert response.status == 400 and body['__type'].endswith('#SerializationException')
    assert response.getheader('x-amzn-query-error') == 'SerializationException;Sender'
    with pytest.raises(ClientError) as excinfo:
        client_for(fake, 'query').describe_alarms()
    assert error_of(excinfo)[0] == 'InvalidAction'
    assert [c['error'] for c in fake.calls] == ['SerializationException', 'InvalidAction']
