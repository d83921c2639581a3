"""The EC2 collector against moto (IAM enforcement on), in both partitions."""
import base64
import datetime
import json
import re

import pytest

import integration_aws_auth as auth
import integration_aws_ec2__main as ec2
import integration_core__runner as core
from conftest import account_of
from servers import FaultProxy, ec2_error

LAUNCH_TIME_RE = re.compile(r'^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$')


def collect(account, regions, **kwargs):
    configs = {'regions': regions}
    configs.update(kwargs.pop('configs', {}))
    collector = ec2.DataCollector(account, configs, **kwargs)
    collector.start()             # as the Runner does: regions begin, then the identity call
    collector.identity()
    points = list(collector.collect())
    return collector, points


def by_name(points):
    return {p['tags']['name']: p for p in points}


def test_every_tag_and_field_on_real_responses(aws, user):
    region = 'us-west-1'
    named = aws.run_instances(region, 2, per_reservation=2, name='web server',
                              tags={'team': 'sre'}, user_data='#!/bin/sh\necho TOPSECRET_USERDATA')
    unnamed = aws.run_instances(region, 1, instance_type='m5.large')
    account = account_of(user, extra_tags={'account_name': 'prod', 'env': 'test'})
    with aws.recording() as calls:
        collector, points = collect(account, [region])
    points = by_name(points)
    assert set(named + unnamed) <= set(points)
    for instance_id in named + unnamed:
        point = points[instance_id]
        tags, fields = point['tags'], point['fields']
        assert point['measurement'] == 'aws_ec2'
        assert isinstance(point['timestamp'], int) and point['timestamp'] > 1.6e18
        assert tags['name'] == tags['InstanceId'] == instance_id
        assert tags['RegionId'] == region
        assert tags['AvailabilityZone'].startswith(region) and tags['AvailabilityZone'] != region
        assert tags['State'] == 'running'
        assert tags['cloud_provider'] == 'AWS'
        assert tags['account_name'] == 'prod' and tags['env'] == 'test'
        assert all(isinstance(v, str) and v and '\n' not in v for v in tags.values())
        assert LAUNCH_TIME_RE.match(fields['LaunchTime'])
        message = json.loads(fields['message'])
        assert message['InstanceId'] == instance_id
        assert tags.get('PlatformDetails') == message.get('PlatformDetails')   # moto omits it
        assert json.loads(fields['Placement'])['AvailabilityZone'] == tags['AvailabilityZone']
        assert json.loads(fields['BlockDeviceMappings']) == message['BlockDeviceMappings']
        assert json.loads(fields['NetworkInterfaces']) == message['NetworkInterfaces']
        assert json.loads(fields['Tags']) == message.get('Tags', [])
        assert message['LaunchTime'] == fields['LaunchTime']
    assert points[named[0]]['tags']['InstanceName'] == 'web server'
    assert points[named[0]]['tags']['InstanceType'] == 't3.micro'
    assert {'Key': 'team', 'Value': 'sre'} in json.loads(points[named[0]]['fields']['Tags'])
    assert 'InstanceName' not in points[unnamed[0]]['tags']
    assert points[unnamed[0]]['tags']['InstanceType'] == 'm5.large'
    # UserData is never requested nor reported.
    everything = json.dumps(list(points.values()))
    assert 'UserData' not in everything and 'TOPSECRET' not in everything
    assert base64.b64encode(b'TOPSECRET').decode()[:8] not in everything
    assert not [c for c in calls if c['action'] == 'DescribeInstanceAttribute']
    # API calls = pages + one identity call
    (result,) = collector.results
    assert result['error'] is None and result['instances'] == len(points)
    described = [c for c in calls if c['action'] == 'DescribeInstances']
    assert len(described) == result['pages'] == result['api_calls']
    assert [c['action'] for c in calls if c['service'] == 'sts'] == ['GetCallerIdentity']


def test_stopped_instance_has_state_reason(aws, user):
    region = 'ca-central-1'
    (instance_id,) = aws.run_instances(region, 1)
    aws.client('ec2', region).stop_instances(InstanceIds=[instance_id])
    _, points = collect(account_of(user), [region])
    tags = by_name(points)[instance_id]['tags']
    assert tags['State'] == 'stopped'
    assert tags['StateReason_Code'] == 'Client.UserInitiatedShutdown'


def test_both_partitions_with_their_own_credentials(aws, user, cn_user):
    cn_ids = aws.run_instances('cn-north-1', 2, name='cn-web')
    aws_ids = aws.run_instances('eu-west-3', 1)
    cn_collector, cn_points = collect(account_of(cn_user), ['cn-north-1'])
    _, aws_points = collect(account_of(user), ['eu-west-3'])
    assert set(cn_ids) <= set(by_name(cn_points)) and set(aws_ids) <= set(by_name(aws_points))
    assert cn_collector.identity()['partition'] == 'aws-cn'
    assert all(p['tags']['RegionId'] == 'cn-north-1' for p in cn_points)
    # keys of one partition are refused in the other: the account fails as a whole
    with pytest.raises(auth.AuthError, match='InvalidClientTokenId'):
        ec2.DataCollector(account_of(user), {'regions': ['cn-north-1']}).identity()


def test_pagination_across_many_reservations(aws, user):
    region = 'ap-south-1'
    ids = aws.run_instances(region, 13, per_reservation=1)
    with aws.recording() as calls:
        collector, points = collect(account_of(user), [region], configs={'page_size': 5})
    assert set(ids) <= set(by_name(points))
    assert len(points) == len(set(by_name(points))), 'no instance twice'
    described = [c for c in calls if c['action'] == 'DescribeInstances']
    assert len(described) >= 3 and collector.results[0]['pages'] == len(described)
    assert all(c['params']['MaxResults'] == '5' for c in described)
    assert 'NextToken' not in described[0]['params']
    assert all(c['params'].get('NextToken') for c in described[1:])


def test_all_enabled_regions(aws, user):
    a = aws.run_instances('eu-central-1', 1)
    b = aws.run_instances('sa-east-1', 1)
    with aws.recording() as calls:
        collector, points = collect(account_of(user), ['*'])
    names = by_name(points)
    assert set(a + b) <= set(names)
    assert names[a[0]]['tags']['RegionId'] == 'eu-central-1'
    regions = [r['region'] for r in collector.results]
    assert {'eu-central-1', 'sa-east-1', 'us-east-1'} <= set(regions)
    assert not any(r.startswith('cn-') for r in regions)
    assert [c['action'] for c in calls if c['service'] == 'ec2'].count('DescribeRegions') == 1
    assert all(r['error'] is None for r in collector.results), [r for r in collector.results if r['error']]


def test_all_regions_in_china_from_the_keys_partition(aws, cn_user):
    ids = aws.run_instances('cn-northwest-1', 1)
    collector, points = collect(account_of(cn_user), ['*'])
    assert {r['region'] for r in collector.results} == {'cn-north-1', 'cn-northwest-1'}
    assert set(ids) <= set(by_name(points))


def test_filters_and_after_collect(aws, user):
    region = 'eu-west-2'
    small = aws.run_instances(region, 2, instance_type='t3.small')
    big = aws.run_instances(region, 1, instance_type='m5.xlarge')
    seen = []

    def only_small(obj):
        seen.append(obj)
        return obj['InstanceType'] == 't3.small'

    def add_owner(point):
        if point['tags']['name'] == small[1]:
            return None
        point['tags']['owner'] = 'sre'
        return point

    _, points = collect(account_of(user), [region], filters=[only_small], after_collect=add_owner)
    names = by_name(points)
    assert small[0] in names and small[1] not in names and big[0] not in names
    assert names[small[0]]['tags']['owner'] == 'sre'
    assert {'InstanceType', 'RegionId', 'message', 'LaunchTime'} <= set(seen[0])


def test_a_failing_hook_names_itself_and_the_instance(aws, user):
    bad_region, good_region = 'eu-south-1', 'eu-north-1'
    (victim,) = aws.run_instances(bad_region, 1)
    good = aws.run_instances(good_region, 1)

    def picky(obj):
        if obj['RegionId'] == bad_region:
            raise KeyError('Owner')
        return True

    collector, points = collect(account_of(user), [bad_region, good_region], filters=[picky])
    results = {r['region']: r for r in collector.results}
    assert results[bad_region]['error'].startswith('filters[0] (picky) raised KeyError')
    assert victim in results[bad_region]['error']
    assert results[good_region]['error'] is None
    assert set(good) <= set(by_name(points))


def test_denied_region_is_reported_while_others_deliver(emulator, user, monkeypatch):
    denied, allowed = 'ap-northeast-2', 'ap-northeast-3'
    ids = emulator.run_instances(allowed, 2)
    body = ec2_error('UnauthorizedOperation', 'You are not authorized to perform this operation.')
    proxy = FaultProxy(emulator.url, lambda r: ('status', 403, body)
                       if r['service'] == 'ec2' and r['region'] == denied else None)
    monkeypatch.setenv('AWS_ENDPOINT_URL', proxy.url)
    try:
        collector, points = collect(account_of(user), [denied, allowed])
    finally:
        proxy.stop()
    results = {r['region']: r for r in collector.results}
    assert 'UnauthorizedOperation' in results[denied]['error']
    assert 'allow ec2:DescribeInstances' in results[denied]['error']
    assert results[allowed]['error'] is None
    assert set(ids) <= set(by_name(points))


def test_unreachable_endpoint_is_reported_once(emulator, user, monkeypatch):
    dead, alive = 'me-central-1', 'me-south-1'
    ids = emulator.run_instances(alive, 1)
    proxy = FaultProxy(emulator.url, lambda r: 'reset'
                       if r['service'] == 'ec2' and r['region'] == dead else None)
    monkeypatch.setenv('AWS_ENDPOINT_URL', proxy.url)
    try:
        collector, points = collect(account_of(user), [dead, alive],
                                    configs={'max_attempts': 2, 'retry_mode': 'standard'})
    finally:
        proxy.stop()
    results = {r['region']: r for r in collector.results}
    assert results[dead]['error'] and '\n' not in results[dead]['error']
    assert results[dead]['instances'] == 0
    assert results[alive]['error'] is None and set(ids) <= set(by_name(points))


def test_throttling_is_absorbed(emulator, user, monkeypatch):
    region = 'il-central-1'
    ids = emulator.run_instances(region, 6, per_reservation=1)
    counter = {'n': 0}

    def throttle_every_other(request):
        if request['action'] == 'DescribeInstances':
            counter['n'] += 1
            if counter['n'] % 2:
                return ('status', 503, ec2_error('RequestLimitExceeded', 'Request limit exceeded.'))
        return None

    proxy = FaultProxy(emulator.url, throttle_every_other)
    monkeypatch.setenv('AWS_ENDPOINT_URL', proxy.url)
    try:
        collector, points = collect(account_of(user), [region], configs={'page_size': 5})
    finally:
        proxy.stop()
    (result,) = collector.results
    assert result['error'] is None
    assert set(ids) <= set(by_name(points))
    assert result['api_calls'] == 2 * result['pages']


# -- configuration errors: before any AWS call ---------------------------------

GOOD = {'ak_id': 'AKIAEXAMPLE000000001', 'ak_secret': 'SECRETexample0000000000000000000000000000'}

BAD_CONFIGS = [
    ({'regions': ['cn-nortwest-1']}, "collector_configs['regions'][0] 'cn-nortwest-1' is not an AWS region; did you mean 'cn-northwest-1'?"),
    ({'regions': ['us-east-1', 'us-est-2']}, "collector_configs['regions'][1] 'us-est-2'"),
    ({'regions': 'us-east-1'}, "collector_configs['regions'] must be a list"),
    ({'regions': []}, "collector_configs['regions'] is empty"),
    ({}, "collector_configs['regions'] is missing"),
    ({'regions': ['*', 'us-east-1']}, "must be the only entry"),
    ({'regions': ['us-east-1', 'cn-north-1']}, 'mixes partitions'),
    ({'regions': [5]}, "collector_configs['regions'][0] must be a region id string"),
    ({'regions': ['us-east-1'], 'region': 'x'}, "collector_configs['region'] is not a known key; did you mean 'regions'?"),
    ({'regions': ['us-east-1'], 'member_role_name': 'reader'},
     "collector_configs['member_role_name'] belongs in account, not in collector_configs: move it there"),
    ({'regions': ['us-east-1'], 'page_size': 5000}, "collector_configs['page_size'] must be a whole number from 5 to 1000"),
    ({'regions': ['us-east-1'], 'concurrency': 0}, "collector_configs['concurrency']"),
    ({'regions': ['us-east-1'], 'retry_mode': 'legacy'}, "'adaptive' or 'standard'"),
    (['us-east-1'], 'collector_configs must be a dict'),
]


@pytest.mark.parametrize('configs,expected', BAD_CONFIGS, ids=[e[:40] for _, e in BAD_CONFIGS])
def test_bad_configs(configs, expected):
    with pytest.raises(core.ConfigError) as info:
        ec2.DataCollector(GOOD, configs)
    assert expected in str(info.value)


def test_bad_hooks_and_tag_collisions():
    with pytest.raises(core.ConfigError, match=r'filters\[1\] must be a function'):
        ec2.DataCollector(GOOD, {'regions': ['us-east-1']}, filters=[bool, 'x'])
    with pytest.raises(core.ConfigError, match='after_collect must be a function'):
        ec2.DataCollector(GOOD, {'regions': ['us-east-1']}, after_collect=5)
    with pytest.raises(auth.AccountConfigError, match=r"extra_tags'\]\['name'\] would overwrite"):
        ec2.DataCollector({**GOOD, 'extra_tags': {'name': 'x'}}, {'regions': ['us-east-1']})
    with pytest.raises(auth.AccountConfigError, match="'aws-cn'"):
        ec2.DataCollector({**GOOD, 'assume_role_arn': 'arn:aws:iam::123456789012:role/r'},
                          {'regions': ['cn-north-1']})


def test_configs_by_keyword_and_constructor_does_no_io(monkeypatch):
    def explode(*a, **k):
        raise AssertionError('the constructor must not talk to AWS')
    monkeypatch.setattr(auth, 'get_session', explode)
    collector = ec2.DataCollector(GOOD, configs={'regions': ['us-east-1', 'us-east-1']})
    assert collector.regions == ['us-east-1']
    assert GOOD['ak_secret'] not in repr(collector)


# -- the pure transform ------------------------------------------------------------

RECORDED = {
    'InstanceId': 'i-0123456789abcdef0', 'InstanceType': 't3.micro',
    'PlatformDetails': 'Linux/UNIX', 'State': {'Code': 16, 'Name': 'running'},
    'Placement': {'AvailabilityZone': 'cn-northwest-1a', 'Tenancy': 'default'},
    'LaunchTime': datetime.datetime(2021, 10, 26, 7, 0, 44, tzinfo=datetime.timezone.utc),
    'Tags': [{'Key': 'Name', 'Value': 'line one\nline two'}, {'Key': 'k', 'Value': ''}],
    'BlockDeviceMappings': [{'DeviceName': '/dev/xvda', 'Ebs': {
        'AttachTime': datetime.datetime(2021, 10, 26, 7, 0, 45, tzinfo=datetime.timezone.utc)}}],
    'NetworkInterfaces': [], 'UserData': 'c2VjcmV0',
}


def test_transform_of_a_recorded_instance():
    point = ec2.instance_to_point(RECORDED, 'cn-northwest-1', {'team': ' ops\n'}, 1700000000000000000)
    assert point['tags'] == {
        'name': 'i-0123456789abcdef0', 'InstanceId': 'i-0123456789abcdef0',
        'InstanceType': 't3.micro', 'PlatformDetails': 'Linux/UNIX', 'RegionId': 'cn-northwest-1',
        'InstanceName': 'line one line two', 'State': 'running',
        'AvailabilityZone': 'cn-northwest-1a', 'cloud_provider': 'AWS', 'team': ' ops '}
    assert set(point['fields']) == {'BlockDeviceMappings', 'NetworkInterfaces', 'Placement',
                                    'Tags', 'LaunchTime', 'message'}
    assert point['fields']['LaunchTime'] == '2021-10-26T07:00:44Z'
    assert point['tags']['InstanceName'] == 'line one line two'
    assert point['tags']['team'] == ' ops '
    assert 'StateReason_Code' not in point['tags']
    message = json.loads(point['fields']['message'])
    assert message['BlockDeviceMappings'][0]['Ebs']['AttachTime'] == '2021-10-26T07:00:45Z'
    assert 'UserData' not in message and 'c2VjcmV0' not in json.dumps(point)


@pytest.mark.parametrize('change', [
    {},
    {'NetworkInterfaces': [{'NetworkInterfaceId': 'eni-1', 'Attachment': {
        'AttachTime': datetime.datetime(2021, 10, 26, 7, 0, 44, 250000, tzinfo=datetime.timezone.utc)}}]},
    {'BlockDeviceMappings': [], 'Placement': {}, 'Tags': None},
    # A NUL or the text of one, which AWS never sends (XML has no NUL): the
    # message is still exactly the instance's JSON.
    {'Tags': [{'Key': 'Name', 'Value': 'a\x00b'}]},
    {'Tags': [{'Key': 'Name', 'Value': '\\u0000Tags'}], 'KeyName': '"\\u0000Placement"'},
    # A field's own text naming a later field, as a value or as a key.
    {'BlockDeviceMappings': ['\x00Placement'], 'Placement': {'AvailabilityZone': 'az'}},
    {'NetworkInterfaces': [{'\x00Tags': 1}], 'Tags': [{'Key': 'a', 'Value': 'b'}]},
])
def test_fields_are_the_instance_parts_and_message_its_whole_json(change):
    instance = dict(RECORDED, **change)
    point = ec2.instance_to_point(instance, 'cn-northwest-1', {}, 0)
    plain = json.JSONEncoder(ensure_ascii=False, separators=(',', ':'), default=ec2._json_default)
    shown = {k: v for k, v in instance.items() if k != 'UserData'}
    assert point['fields']['message'] == plain.encode(shown)
    for key, empty in (('BlockDeviceMappings', '[]'), ('NetworkInterfaces', '[]'),
                       ('Placement', '{}'), ('Tags', '[]')):
        assert point['fields'][key] == (plain.encode(instance[key]) if instance.get(key) else empty)
    assert list(point['fields']) == ['BlockDeviceMappings', 'NetworkInterfaces', 'Placement',
                                     'Tags', 'LaunchTime', 'message']


def test_empty_name_tag_is_omitted_and_long_values_are_cut():
    instance = dict(RECORDED, Tags=[{'Key': 'Name', 'Value': ''}], InstanceType='x' * 2000)
    point = ec2.instance_to_point(instance, 'cn-northwest-1', {}, 0)
    assert 'InstanceName' not in point['tags']
    assert len(point['tags']['InstanceType'].encode()) == 1024
