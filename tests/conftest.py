"""Shared fixtures: a moto server with IAM enforcement on, a clean AWS
environment per test, and a guard that fails any test reaching past loopback."""
import ipaddress
import os
import socket
import sys
import threading
import time
import types
import gc
import uuid

import botocore.credentials
import botocore.tokens
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, 'tests'))

from integration_local.emulator import AwsEmulator, USER_POLICY  # noqa: E402

IN_CI = os.environ.get('CI', '').lower() == 'true'


def outside_material(path, what):
    """Material from beside the repository (../shared): its path when it is
    there; else the test is skipped with one line saying what is missing, or,
    under CI (CI=true), where it must be there, fails."""
    path = os.path.normpath(path)
    if os.path.exists(path):
        return path
    message = f'{what} is missing: expected at {path}'
    if IN_CI:
        pytest.fail(f'{message} (CI=true: it must be there)', pytrace=False)
    pytest.skip(message)


LOOPBACK_NAMES = {'localhost', 'localhost.localdomain', 'ip6-localhost'}
_blocked = []
_real_getaddrinfo = socket.getaddrinfo
_real_connect = socket.socket.connect


def _is_loopback(host):
    if host is None:
        return True
    host = host.decode() if isinstance(host, bytes) else str(host)
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip('[]').split('%')[0]).is_loopback
    except ValueError:
        return False


def _guarded_getaddrinfo(host, *args, **kwargs):
    if not _is_loopback(host):
        _blocked.append(host)
        raise OSError(f'test network guard: {host} is not loopback')
    return _real_getaddrinfo(host, *args, **kwargs)


def _guarded_connect(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6) and not _is_loopback(address[0]):
        _blocked.append(address[0])
        raise OSError(f'test network guard: {address[0]} is not loopback')
    return _real_connect(self, address)


socket.getaddrinfo = _guarded_getaddrinfo
socket.socket.connect = _guarded_connect


@pytest.fixture(autouse=True)
def network_guard():
    """Fail the test if anything tried a non-loopback host (amazonaws.com ...),
    even when the code under test caught the error."""
    _blocked.clear()
    yield
    tried = list(_blocked)
    _blocked.clear()
    assert not tried, f'the test tried to reach hosts beyond loopback: {sorted(set(map(str, tried)))}'


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    """No real credentials, config files or metadata service; state in tmp."""
    for name in list(os.environ):
        if name.startswith(('AWS_', 'INTEGRATION_', 'DATAKIT_')) or name.upper() in (
                'HTTPS_PROXY', 'HTTP_PROXY', 'NO_PROXY', 'ALL_PROXY'):
            monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv('AWS_SHARED_CREDENTIALS_FILE', os.devnull)
    monkeypatch.setenv('AWS_CONFIG_FILE', os.devnull)
    # Closed loopback port: the default chain's IMDS probe fails fast here.
    monkeypatch.setenv('AWS_EC2_METADATA_SERVICE_ENDPOINT', 'http://127.0.0.1:9')
    monkeypatch.setenv('AWS_METADATA_SERVICE_TIMEOUT', '1')
    monkeypatch.setenv('INTEGRATION_STATE_DIR', str(tmp_path / 'state'))
    monkeypatch.setenv('NO_PROXY', '127.0.0.1,localhost')
    import integration_core__runner as core
    import integration_local.runtime as local
    core._RUNTIME.clear()
    # As `integration-runner` does: a local DFF (its cache under the tmp state dir).
    local.install(local.LocalDFF())
    yield


@pytest.fixture(scope='session')
def emulator():
    emu = AwsEmulator().start()
    emu.admin('aws')
    emu.admin('aws-cn')
    emu.enforce()
    yield emu
    emu.stop()


@pytest.fixture
def aws(emulator, monkeypatch):
    """The emulator, with boto3 pointed at it through AWS_ENDPOINT_URL."""
    monkeypatch.setenv('AWS_ENDPOINT_URL', emulator.url)
    return emulator


def unique(prefix):
    return f'{prefix}-{uuid.uuid4().hex[:8]}'


@pytest.fixture
def user(aws):
    """A fresh IAM user (aws partition) that may read EC2 and use STS."""
    return aws.make_user(unique('user'), 'aws', policy=USER_POLICY)


@pytest.fixture
def cn_user(aws):
    return aws.make_user(unique('cnuser'), 'aws-cn', policy=USER_POLICY)


def account_of(creds, **extra):
    account = {'ak_id': creds['ak_id'], 'ak_secret': creds['ak_secret']}
    account.update(extra)
    return account


def sts_calls(calls, action=None):
    return [c for c in calls if c['service'] == 'sts' and (action is None or c['action'] == action)]


@pytest.fixture
def seed_estate(aws, monkeypatch):
    """What the seed's four startup scripts need, in aws-cn: a user, a role with
    an ExternalId, an MFA device, an instance role behind a test IMDS, and
    instances in cn-northwest-1. Returns the placeholder values."""
    from integration_local.emulator import ImdsServer
    ids = aws.run_instances('cn-northwest-1', 3, name=unique('seed'))
    user = aws.make_user(unique('collector'), 'aws-cn', policy=USER_POLICY)
    external_id = unique('ext')
    role = aws.make_role(unique('reader'), user['arn'], 'aws-cn', external_id=external_id)
    serial = aws.make_mfa_device(user['arn'].split('/')[-1], 'aws-cn')
    instance_role = aws.make_role(unique('instance'), user['arn'], 'aws-cn')
    imds = ImdsServer(aws.assume(instance_role, user, 'cn-northwest-1')).start()
    monkeypatch.setenv('AWS_EC2_METADATA_SERVICE_ENDPOINT', imds.url)
    values = {
        '<AWS AK ID>': user['ak_id'], '<AWS AK SECRET>': user['ak_secret'],
        '<AWS ASSUME ROLE ARN>': role, '<AWS EXTERNAL ID>': external_id,
        '<AWS ROLE SESSION NAME>': 'Integration', '<MFA DEVICE NUMBER>': serial,
        '<MFA TOTP>': '918273', 'ids': ids, 'user': user, 'role': role,
        'instance_role': instance_role,
    }
    yield values
    imds.stop()


@pytest.fixture
def write_script(tmp_path):
    """Write a startup script (from scripts/ with placeholders filled, or text)."""
    from integration_local.emulator import fill_placeholders

    def write(name_or_text, values=None, filename=None):
        path = os.path.join(ROOT, 'scripts', name_or_text)
        text = open(path, encoding='utf-8').read() if os.path.exists(path) else name_or_text
        target = tmp_path / (filename or (name_or_text if os.path.exists(path) else 'script.py'))
        target.write_text(fill_placeholders(text, values or {}))
        return str(target)
    return write


@pytest.fixture(scope='session')
def influx():
    """A real InfluxDB 1.x (Debian's influxdb): the line-protocol parser that
    checks our escaping; ./run-tests.sh installs it."""
    import shutil
    from influx import Influx
    if not shutil.which('influxd'):
        pytest.fail("influxd is missing: ./run-tests.sh installs Debian's influxdb")
    server = Influx()
    yield server
    server.stop()


@pytest.fixture(scope='session')
def organization(emulator):
    """An AWS Organization in moto (tests/org_estate.py), made once."""
    from org_estate import lay_out
    return lay_out(emulator)


@pytest.fixture
def org(aws, organization, monkeypatch):
    """The Organization behind the cross-account proxy (AWS_ENDPOINT_URL)."""
    from org_estate import CrossAccountRoles
    proxy = CrossAccountRoles(aws.url)
    proxy.roles.update(organization['roles'])
    monkeypatch.setenv('AWS_ENDPOINT_URL', proxy.url)
    yield dict(organization, proxy=proxy)
    proxy.stop()


class Sink:
    """DFF.SRC that keeps what it is given: (category, point) pairs."""

    def __init__(self):
        self.points = []

    def write_by_category_many(self, category, data):
        self.points.extend((category, dict(p)) for p in data)
        return 200, ''

    def metrics(self):
        return [p for c, p in self.points if c == 'metric']


@pytest.fixture
def sink():
    """The local runtime's DataKit is a Sink."""
    import integration_local.runtime as local_runtime
    out = Sink()
    local_runtime.install(local_runtime.LocalDFF(output=out))
    return out


def our_threads_left(grace):
    """The names of our threads (integration-*) still alive after up to
    `grace` seconds (polled: returns as soon as none is left)."""
    def alive():
        return [t.name for t in threading.enumerate() if t.name.startswith('integration-') and t.is_alive()]
    deadline = time.monotonic() + grace
    while alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    return alive()


def reachable(root, secrets):
    """What of credentials is reachable from `root`: objects' attributes,
    containers, closures and bound methods (not module globals)."""
    found, seen, stack = [], set(), [('shared', root)]
    while stack and len(seen) < 2000000:
        path, obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, str):
            if any(secret in obj for secret in secrets):
                found.append(f'{path}: a secret')
            continue
        if isinstance(obj, (bytes, bytearray)):
            if any(secret.encode() in obj for secret in secrets):
                found.append(f'{path}: a secret (bytes)')
            continue
        if obj is os.environ or isinstance(obj, (int, float, type(None), type, types.ModuleType)):
            continue
        if isinstance(obj, (botocore.credentials.Credentials, botocore.tokens.DeferredRefreshableToken,
                            botocore.tokens.FrozenAuthToken)):
            found.append(f'{path}: {type(obj).__name__}')
            continue
        if isinstance(obj, dict):
            stack.extend((f'{path}[{str(k)[:30]}]', v) for k, v in obj.items())
            stack.extend((f'{path} key', k) for k in obj if not isinstance(k, str))
        elif isinstance(obj, (list, tuple, set, frozenset)):
            stack.extend((f'{path}[{i}]', v) for i, v in enumerate(obj))
        elif isinstance(obj, types.FunctionType):
            stack.extend((f'{path}.<closure>', c.cell_contents) for c in obj.__closure__ or ()
                         if c.cell_contents is not None)
        elif isinstance(obj, types.MethodType):
            stack.append((f'{path}.__self__', obj.__self__))
        else:
            attributes = dict(getattr(obj, '__dict__', None) or {})
            for name in getattr(type(obj), '__slots__', ()):
                if hasattr(obj, name):
                    attributes[name] = getattr(obj, name)
            stack.extend((f'{path}.{k}', v) for k, v in attributes.items())
            if not attributes:
                stack.extend((f'{path}.<{type(obj).__name__}>', r) for r in gc.get_referents(obj))
    return found


SSO_TOKEN = 'sso-bearer-not-real'


def sso_profile(tmp_path, monkeypatch):
    """AWS_CONFIG_FILE whose default profile has an SSO session, its bearer
    token (SSO_TOKEN) in the SSO cache: every client botocore makes loads it."""
    import hashlib
    import json
    cache = tmp_path / '.aws' / 'sso' / 'cache'
    cache.mkdir(parents=True)
    config = tmp_path / '.aws' / 'config'
    config.write_text('[default]\nsso_session = corp\n\n[sso-session corp]\nsso_region = us-east-1\n'
                      'sso_start_url = https://example.awsapps.com/start\n')
    (cache / (hashlib.sha1(b'corp').hexdigest() + '.json')).write_text(json.dumps({
        'accessToken': SSO_TOKEN, 'expiresAt': '2999-01-01T00:00:00Z',
        'region': 'us-east-1', 'startUrl': 'https://example.awsapps.com/start'}))
    monkeypatch.setattr(botocore.tokens.SSOTokenProvider, '_SSO_TOKEN_CACHE_DIR', str(cache))
    monkeypatch.setenv('AWS_CONFIG_FILE', str(config))
