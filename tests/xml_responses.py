"""Generated XML answers of the query protocols, and the comparison of our
sessions' parser (auth.FastXMLStructures) with botocore's own on them.

Used by tests/test_fast_parser.py, and run alone under Func's Python 3.8 and
botocore (tests/functier/test_in_func.py):

    python tests/xml_responses.py      # exit 0: every answer parsed alike
"""
import base64
import json
import os
import random
import sys
import xml.sax.saxutils

import botocore.parsers
import botocore.session

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import integration_aws_auth as auth     # noqa: E402

NAMESPACE = 'http://ec2.amazonaws.com/doc/2016-11-15/'


def response_xml(shape, rng, *, root='Response', namespace=NAMESPACE, shuffle=True):
    body = ''.join(_members(shape, rng, 0, shuffle))
    wrapper = shape.serialization.get('resultWrapper')     # the query protocol's <XResult>
    if wrapper:
        body = f'<{wrapper}>{body}</{wrapper}>'
    xmlns = f' xmlns="{namespace}"' if namespace else ''
    return f'<?xml version="1.0" encoding="UTF-8"?><{root}{xmlns}><requestId>r-1</requestId>{body}</{root}>'.encode()


def _members(shape, rng, depth, shuffle):
    parts = []
    chosen = rng.choice(list(shape.members)) if shape.is_tagged_union else None
    for name, member in shape.members.items():
        if (chosen or name) != name or rng.random() < (0 if chosen else 0.25):
            continue                        # a union: exactly one member
        serialization = member.serialization
        xml_name = serialization.get('name') or name
        if member.type_name == 'list' and serialization.get('flattened'):
            item_name = member.member.serialization.get('name') or xml_name
            parts.extend(f'<{item_name}>{_value(member.member, rng, depth + 1, shuffle)}</{item_name}>'
                         for _ in range(rng.randrange(0, 3)))
        else:
            parts.append(f'<{xml_name}>{_value(member, rng, depth + 1, shuffle)}</{xml_name}>')
    if shuffle and rng.random() < 0.3:
        rng.shuffle(parts)
    return parts


def _value(shape, rng, depth, shuffle):
    kind = shape.type_name
    if kind == 'structure':
        return '' if depth > 6 else ''.join(_members(shape, rng, depth, shuffle))
    if kind == 'list':
        item = shape.member.serialization.get('name') or 'member'
        count = 0 if depth > 6 else rng.randrange(0, 3)
        return ''.join(f'<{item}>{_value(shape.member, rng, depth + 1, shuffle)}</{item}>' for _ in range(count))
    if kind == 'map':
        key = shape.key.serialization.get('name') or 'key'
        value = shape.value.serialization.get('name') or 'value'
        return ''.join(f'<entry><{key}>k{n}</{key}><{value}>{_value(shape.value, rng, depth + 1, shuffle)}'
                       f'</{value}></entry>' for n in range(rng.randrange(0, 3)))
    if kind == 'boolean':
        return rng.choice(['true', 'false'])
    if kind in ('integer', 'long'):
        return str(rng.randrange(-5, 10 ** 12))
    if kind in ('float', 'double'):
        return repr(rng.random() * 1000)
    if kind == 'timestamp':
        return rng.choice(['2026-11-29T10:00:00.000Z', '2026-01-02T03:04:05Z', '2026-11-29T10:00:00+01:00'])
    if kind == 'blob':
        return base64.b64encode(b'blob \x00\xff').decode()
    return xml.sax.saxutils.escape(rng.choice(['', 'plain', 'é & <b> "q"', '  spaced  ', 'a' * 40]))


def parse_both(shape, body, protocol='ec2'):
    response = {'body': body, 'headers': {}, 'status_code': 200}
    stock = botocore.parsers.PROTOCOL_PARSERS[protocol](timestamp_parser=auth.fast_timestamp)
    fast = auth.FAST_XML_PARSERS[protocol](timestamp_parser=auth.fast_timestamp)
    return stock.parse(dict(response), shape), fast.parse(dict(response), shape)


def assert_same(stock, fast):
    assert fast == stock
    # The same key order, all the way down.
    assert json.dumps(fast, default=str) == json.dumps(stock, default=str)


def output_shapes(service, prefix=''):
    model = botocore.session.Session().get_service_model(service)
    for name in model.operation_names:
        if name.startswith(prefix):
            shape = model.operation_model(name).output_shape
            if shape is not None:
                yield name, shape


SERVICES = [('ec2', 'Describe', 'ec2'), ('sts', '', 'query'), ('iam', 'List', 'query'),
            ('cloudwatch', '', 'query')]


def check_service(service, prefix, protocol):
    """Three generated answers for every output shape of the service's
    operations named prefix...; returns how many were compared."""
    rng = random.Random(f'{service}-{prefix}')
    checked = 0
    for name, shape in output_shapes(service, prefix):
        for attempt in range(3):
            body = response_xml(shape, rng, namespace=NAMESPACE if attempt != 1 else None,
                                shuffle=attempt == 2)
            stock, fast = parse_both(shape, body, protocol)
            assert_same(stock, fast)
            checked += 1
    return checked


if __name__ == '__main__':
    import botocore
    counts = {service: check_service(service, prefix, protocol) for service, prefix, protocol in SERVICES}
    print(f'botocore {botocore.__version__}: parsed alike:', counts)
