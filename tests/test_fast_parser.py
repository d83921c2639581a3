"""The XML response parser of our sessions (auth.FastXMLStructures) against
botocore's own: the same dicts, in the same key order (the `message` field of
an EC2 object is the instance's JSON), for

  - generated responses of every output shape of EC2's Describe operations,
    STS, IAM and CloudWatch's query models: every member present or absent at
    random, elements in shuffled order, empty elements, text to escape,
    namespaced or not;
  - shapes it leaves to botocore (XML attributes, flattened lists and maps,
    two members under one element name);
  - real answers of moto's server through a client of our sessions.
"""
import datetime
import random

import botocore.model
import botocore.parsers
import botocore.utils
import pytest

import integration_aws_auth as auth
from xml_responses import (NAMESPACE, SERVICES, assert_same, check_service, output_shapes, parse_both,
                           response_xml)


@pytest.mark.parametrize('service, prefix, protocol', SERVICES)
def test_generated_responses_parse_as_botocore_does(service, prefix, protocol):
    assert check_service(service, prefix, protocol) > (300 if service == 'ec2' else 10)


def test_a_second_parse_uses_the_plans_and_agrees():
    shape = dict(output_shapes('ec2', 'DescribeInstances'))['DescribeInstances']
    rng = random.Random(7)
    bodies = [response_xml(shape, rng) for _ in range(20)]
    for body in bodies + bodies:
        assert_same(*parse_both(shape, body))


def test_timestamps_and_numbers_are_typed_as_botocore_types_them():
    shape = dict(output_shapes('ec2', 'DescribeInstances'))['DescribeInstances']
    body = (f'<DescribeInstancesResponse xmlns="{NAMESPACE}"><reservationSet><item><instancesSet><item>'
            '<instanceId>i-1</instanceId><launchTime>2026-11-29T10:00:00.000Z</launchTime>'
            '<amiLaunchIndex>3</amiLaunchIndex><ebsOptimized>true</ebsOptimized>'
            '<tagSet><item><key>Name</key><value/></item></tagSet><placement/>'
            '</item></instancesSet></item></reservationSet></DescribeInstancesResponse>').encode()
    stock, fast = parse_both(shape, body)
    assert_same(stock, fast)
    instance = fast['Reservations'][0]['Instances'][0]
    assert instance['LaunchTime'] == datetime.datetime(2026, 11, 29, 10, tzinfo=datetime.timezone.utc)
    assert instance['AmiLaunchIndex'] == 3 and instance['EbsOptimized'] is True
    assert instance['Tags'] == [{'Key': 'Name', 'Value': ''}] and instance['Placement'] == {}


@pytest.mark.parametrize('text, expected', [
    ('2026-11-29T10:00:00.000Z', '2026-11-29T10:00:00Z'),       # AWS's own form
    ('2026-11-29T10:00:00Z', '2026-11-29T10:00:00Z'),
    ('2026-11-29T10:00:00.250Z', '2026-11-29T10:00:00.250000Z'),
    ('2026-11-29T12:00:00+02:00', '2026-11-29T10:00:00Z'),
    ('2026-02-30T10:00:00.000Z', None),                         # no such day: an error
])
def test_a_collectors_text_timestamps_are_iso_time_of_botocores_datetimes(text, expected):
    """With text_timestamps (the EC2 collector's sessions), EC2's times come as
    the text iso_time makes of the datetime botocore would give, all else alike."""
    shape = dict(output_shapes('ec2', 'DescribeInstances'))['DescribeInstances']
    body = (f'<DescribeInstancesResponse xmlns="{NAMESPACE}"><reservationSet><item><instancesSet><item>'
            f'<instanceId>i-1</instanceId><launchTime>{text}</launchTime><blockDeviceMapping><item>'
            f'<deviceName>/dev/xvda</deviceName><ebs><attachTime>{text}</attachTime></ebs></item>'
            '</blockDeviceMapping></item></instancesSet></item></reservationSet></DescribeInstancesResponse>'
            ).encode()
    factory = auth.new_botocore_session(text_timestamps=True).get_component('response_parser_factory')
    parser = factory.create_parser('ec2')
    response = {'body': body, 'headers': {}, 'status_code': 200}
    if expected is None:
        # Refused as botocore's own parser (with our timestamp parser) refuses it.
        with pytest.raises(Exception) as stock:
            botocore.parsers.EC2QueryParser(timestamp_parser=auth.fast_timestamp).parse(dict(response), shape)
        with pytest.raises(type(stock.value)) as ours:
            parser.parse(dict(response), shape)
        assert str(ours.value) == str(stock.value)
        return
    stock = botocore.parsers.EC2QueryParser().parse(dict(response), shape)
    text_parsed = parser.parse(dict(response), shape)
    instance = text_parsed['Reservations'][0]['Instances'][0]
    assert instance['LaunchTime'] == expected == auth.iso_time(
        stock['Reservations'][0]['Instances'][0]['LaunchTime'])
    assert instance['BlockDeviceMappings'][0]['Ebs']['AttachTime'] == expected
    # Only EC2's: STS (AssumeRole's Expiration) and sessions without it keep datetimes.
    assert isinstance(factory.create_parser('query'), auth.FastQueryParser)
    assert factory.create_parser('query')._timestamp_parser is auth.fast_timestamp
    plain = auth.new_botocore_session().get_component('response_parser_factory').create_parser('ec2')
    assert isinstance(plain.parse(dict(response), shape)['Reservations'][0]['Instances'][0]['LaunchTime'],
                      datetime.datetime)


@pytest.mark.parametrize('text', [
    '2026-11-29T10:00:00.000Z', '2026-11-29T10:00:00Z', '2026-11-29T10:00:00.123456Z',
    '2026-11-29t10:00:00z', '2026-11-29T10:00:00-05:00', '0500-01-01T00:00:00.000Z',
    '\uff12\uff10\uff12\uff16-11-29T10:00:00Z', '2026-11-29T23:59:59.000Z', '1000-01-01T00:00:00Z',
])
def test_text_timestamp_is_iso_time_of_botocores_datetime(text):
    assert auth.text_timestamp(text) == auth.iso_time(botocore.utils.parse_timestamp(text))


def synthetic_shape(members, extra_shapes=None):
    shapes = {'Out': {'type': 'structure', 'members': members},
              'S': {'type': 'string'}, 'I': {'type': 'integer'},
              'Flat': {'type': 'list', 'member': {'shape': 'S', 'locationName': 'Entry'}, 'flattened': True},
              'FlatMap': {'type': 'map', 'key': {'shape': 'S'}, 'value': {'shape': 'I'}, 'flattened': True},
              'Inner': {'type': 'structure', 'members': {'Id': {'shape': 'S', 'locationName': 'id'}}},
              'Inners': {'type': 'list', 'member': {'shape': 'Inner', 'locationName': 'item'}}}
    shapes.update(extra_shapes or {})
    return botocore.model.ShapeResolver(shapes).get_shape_by_name('Out')


@pytest.mark.parametrize('members, body', [
    # A flattened list: repeated elements, in and out of order with others.
    ({'Names': {'shape': 'Flat'}, 'Count': {'shape': 'I'}},
     '<Entry>a</Entry><Count>2</Count><Entry>b</Entry>'),
    # Left to botocore: an XML attribute, a flattened map, two members under one name.
    ({'Kind': {'shape': 'S', 'locationName': 'kind', 'xmlAttribute': True}, 'Name': {'shape': 'S'}},
     '<Name>n</Name>'),
    ({'Counts': {'shape': 'FlatMap'}, 'Name': {'shape': 'S'}},
     '<Counts><key>a</key><value>1</value></Counts><Counts><key>b</key><value>2</value></Counts><Name>x</Name>'),
    ({'A': {'shape': 'S', 'locationName': 'x'}, 'B': {'shape': 'I', 'locationName': 'x'}},
     '<x>1</x>'),
    # A structure inside a list inside a structure, with an element the model does not know.
    ({'Items': {'shape': 'Inners', 'locationName': 'itemSet'}, 'Name': {'shape': 'S'}},
     '<Unknown><deep/></Unknown><itemSet><item><id>1</id><other>z</other></item><item/></itemSet><Name/>'),
])
def test_shapes_left_to_botocore_or_read_alike(members, body):
    shape = synthetic_shape(members)
    xml_body = f'<Response xmlns="{NAMESPACE}">{body}</Response>'.encode()
    assert_same(*parse_both(shape, xml_body, 'query'))


def test_sessions_use_the_fast_parser_and_answers_from_moto_match(aws, seed_estate):
    """A client of our sessions parses moto's DescribeInstances as a stock botocore
    client does, for an estate with tags, network interfaces and block devices."""
    user = seed_estate['user']
    session = auth.get_session({'ak_id': user['ak_id'], 'ak_secret': user['ak_secret']},
                               region='cn-northwest-1')
    factory = session._session.get_component('response_parser_factory')
    assert isinstance(factory.create_parser('ec2'), auth.FastEC2QueryParser)
    assert type(factory.create_parser('json')) is botocore.parsers.JSONParser
    bodies = []
    ours = session.client('ec2', region_name='cn-northwest-1')
    ours.meta.events.register('before-parse.ec2.DescribeInstances',
                              lambda response_dict, **_: bodies.append(response_dict['body']))
    parsed = ours.describe_instances()
    assert parsed['Reservations'], 'the seeded estate has instances'
    shape = ours.meta.service_model.operation_model('DescribeInstances').output_shape
    stock, fast = parse_both(shape, bodies[0])
    assert_same(stock, fast)
    parsed.pop('ResponseMetadata')
    stock.pop('ResponseMetadata')
    assert parsed == stock


def test_a_repeated_element_is_read_as_botocore_reads_it():
    """AWS does not repeat a member's element; if it did, botocore's reading
    (whatever it gives) is kept, not a guess of ours."""
    shape = dict(output_shapes('ec2', 'DescribeInstances'))['DescribeInstances']
    body = (f'<DescribeInstancesResponse xmlns="{NAMESPACE}"><reservationSet><item><instancesSet><item>'
            '<instanceId>i-1</instanceId><ebsOptimized>true</ebsOptimized><ebsOptimized>true</ebsOptimized>'
            '<tagSet><item><key>a</key><value>1</value></item></tagSet><tagSet/>'
            '</item></instancesSet></item></reservationSet></DescribeInstancesResponse>').encode()
    stock, fast = parse_both(shape, body)
    assert_same(stock, fast)
    assert fast['Reservations'][0]['Instances'][0]['EbsOptimized'] is False     # botocore's reading


def test_plans_are_made_once_per_shape_not_per_client():
    """botocore copies a query protocol's output shape (its resultWrapper) for
    every client: the plans stay one per shape however many clients parse."""
    plans = auth.process_shared().data.setdefault(('xml_plans', auth._code_version()), {})
    body = ('<GetCallerIdentityResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">'
            '<GetCallerIdentityResult><Arn>arn:aws:iam::123456789012:user/u</Arn>'
            '<UserId>AIDA</UserId><Account>123456789012</Account></GetCallerIdentityResult>'
            '</GetCallerIdentityResponse>').encode()

    def parse_with_a_new_model():
        shape = auth.new_botocore_session().get_service_model('sts').operation_model(
            'GetCallerIdentity').output_shape
        return parse_both(shape, body, 'query')[1]

    assert parse_with_a_new_model()['Account'] == '123456789012'
    size = len(plans)
    for _ in range(20):
        assert parse_with_a_new_model()['Account'] == '123456789012'
    assert len(plans) == size


def test_botocore_initializers_run_once_on_our_sessions():
    """botocore.register_initializer's handlers run once on each of our
    sessions, as on botocore's, and not after unregister_initializer."""
    import botocore
    ran = []

    def initializer(session):
        session.register('custom-event.test', lambda **_: ran.append(1))

    botocore.register_initializer(initializer)
    try:
        auth.new_botocore_session().get_component('event_emitter').emit('custom-event.test')
        assert len(ran) == 1
    finally:
        botocore.unregister_initializer(initializer)
    ran.clear()
    auth.new_botocore_session().get_component('event_emitter').emit('custom-event.test')
    assert ran == []
