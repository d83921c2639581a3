"""Clients kept between runs of one process (auth.take_client / keep_clients),
as in a Func worker that runs the same startup script every few minutes: the
next run of the same credentials and SDK environment takes them, signing with
its own credentials; nothing else ever does; a kept client holds no
credentials; a run that ends early keeps none; a taken client is cancelled
with the run that took it."""
import threading
import time

import botocore.session
import botocore.tokens
import pytest

import integration_aws_auth as auth
import integration_aws_ec2__main as ec2
import integration_core__runner as core
import integration_local.cli as local_cli
from conftest import SSO_TOKEN, account_of, our_threads_left, reachable, sso_profile
from servers import FaultProxy

REGIONS = ['us-east-1', 'us-west-2']


def count_clients(monkeypatch, service):
    """The clients of `service` botocore makes from now on."""
    clients = []
    create = botocore.session.Session.create_client

    def counting(self, service_name, *args, **kwargs):
        client = create(self, service_name, *args, **kwargs)
        if service_name == service:
            clients.append(client)
        return client
    monkeypatch.setattr(botocore.session.Session, 'create_client', counting)
    return clients


@pytest.fixture
def made(monkeypatch):
    """The EC2 clients botocore makes."""
    return count_clients(monkeypatch, 'ec2')


def kept():
    return dict(auth.process_shared().data.get('kept_clients.v1', {}))


def collect(account, regions=REGIONS):
    return core.Runner(ec2.DataCollector(account, {'regions': regions}), force=True).run()


@pytest.fixture
def estate(aws):
    return {region: aws.run_instances(region, 2) for region in REGIONS}


def test_a_second_run_takes_the_clients_of_the_first(aws, user, estate, sink, made):
    account = account_of(user)
    collect(account)
    first = list(made)
    assert len(first) == 2
    # While kept, a client holds no credentials.
    mine = [client for _, client in kept().values() if client in first]
    assert len(mine) == 2 and all(c._request_signer._credentials is None for c in mine)
    written = len(sink.points)
    with aws.recording() as calls:
        collect(account)
    assert made == first, 'the second run made clients of its own'
    assert len(sink.points) == 2 * written and written >= 4
    describes = [c for c in calls if c['action'] == 'DescribeInstances']
    assert len(describes) == 2 and {c['access_key'] for c in describes} == {user['ak_id']}


def test_a_kept_client_never_serves_other_credentials(aws, user, estate, sink, made):
    other = aws.make_user(f"other-{user['ak_id'][-6:].lower()}", 'aws')
    collect(account_of(user))
    with aws.recording() as calls:
        collect(account_of(other))
    assert len(made) == 4, 'the other keys took the first keys\' clients'
    describes = [c for c in calls if c['action'] == 'DescribeInstances']
    assert {c['access_key'] for c in describes} == {other['ak_id']}
    # The same keys with another secret (rotated): not the kept clients either.
    with pytest.raises(core.RunFailed):
        collect(dict(account_of(user), ak_secret='x' * 40))
    assert len(made) == 6


def test_a_changed_sdk_environment_gets_new_clients(aws, user, estate, sink, made, monkeypatch):
    collect(account_of(user))
    proxy = FaultProxy(aws.url)
    try:
        monkeypatch.setenv('AWS_ENDPOINT_URL_EC2', proxy.url)
        collect(account_of(user))
        assert len(made) == 4
        assert [r['action'] for r in proxy.seen] == ['DescribeInstances'] * 2
    finally:
        proxy.stop()



def test_a_taken_client_is_cancelled_with_its_run_and_a_stopped_run_keeps_none(
        aws, user, estate, sink, made, monkeypatch):
    """The second run takes the first run's clients, and its requests hang:
    at its timeout, their sockets are shut (no thread is left waiting on
    them), and the clients of a run that ended early are not kept."""
    hang = threading.Event()
    proxy = FaultProxy(aws.url, rule=lambda r: ('delay', 20) if hang.is_set() else None)
    try:
        monkeypatch.setenv('AWS_ENDPOINT_URL_EC2', proxy.url)
        account = account_of(user)
        collect(account)
        taken = list(made)
        hang.set()
        collector = ec2.DataCollector(account, {'regions': REGIONS})
        api = {'title': 'hangs', 'name': 'run', 'timeout': 2,
               'func': lambda: core.Runner(collector, force=True).run()}
        started = time.monotonic()
        assert local_cli.run_api(api) == local_cli.EXIT_FAILED
        assert time.monotonic() - started < 2 + 1.5
        assert made == taken, 'the hanging run did not take the kept clients'
        assert our_threads_left(core.STOP_GRACE + 1) == [], 'a thread still waits on a request of the cancelled run'
        assert not [c for _, c in kept().values() if c in taken]
        hang.clear()
        collect(account)
        assert len(made) == 4, 'a client of the stopped run was taken again'
    finally:
        proxy.stop()


def test_kept_clients_are_bounded(aws, user, estate, sink, monkeypatch):
    monkeypatch.setattr(auth, 'KEPT_CLIENTS', 1)
    collect(account_of(user))
    assert len(kept()) == 1


def test_cloudwatch_runs_take_the_clients_of_the_last_run(aws, user, sink, monkeypatch):
    import integration_aws_cloudwatch__main as cw
    made = count_clients(monkeypatch, 'cloudwatch')
    for _ in range(2):
        core.Runner(cw.DataCollector(account_of(user), {'regions': REGIONS}), force=True).run()
    assert len(made) == 2


def test_what_the_process_keeps_holds_no_credentials(aws, user, estate, sink):
    """After runs of keys and of a role session (temporary credentials), the
    process-wide state (kept clients included) holds no credentials object
    and no secret."""
    role = aws.make_role(f"kept-{user['ak_id'][-6:].lower()}", user['arn'], 'aws')
    collect(account_of(user))
    collect(account_of(user, assume_role_arn=role))
    assert len(kept()) >= 4
    session = auth.get_session(account_of(user, assume_role_arn=role), region='us-east-1')
    token = session.get_credentials().get_frozen_credentials()
    found = reachable(auth.process_shared().data, [user['ak_secret'], token.secret_key, token.token])
    assert found == []


def test_a_kept_client_holds_no_sso_token(aws, user, estate, sink, monkeypatch, tmp_path):
    """A profile with sso_session gives every client an SSO bearer token: a
    kept client holds none, and the run that takes it gives it its own."""
    sso_profile(tmp_path, monkeypatch)
    monkeypatch.setenv('AWS_ACCESS_KEY_ID', user['ak_id'])
    monkeypatch.setenv('AWS_SECRET_ACCESS_KEY', user['ak_secret'])
    collect({})                         # the default chain: the keys of the environment
    ours = [client for _, client in kept().values() if client.meta.region_name in REGIONS]
    assert ours and all(c._request_signer._auth_token is None for c in ours)
    assert reachable(auth.process_shared().data, [user['ak_secret'], SSO_TOKEN]) == []
    taken = auth.take_client(auth.get_session({}, region=REGIONS[0]), 'ec2', REGIONS[0],
                             auth.client_config({}, 'integration_aws_ec2'))
    assert taken._request_signer._auth_token.get_frozen_token().token == SSO_TOKEN


def test_a_changed_config_file_gets_new_clients(aws, user, estate, sink, made, monkeypatch, tmp_path):
    """The SDK's config file (AWS_CONFIG_FILE or ~/.aws/config) can change how
    a client is made (endpoints, FIPS, CA bundle ...): edited, new clients."""
    config = tmp_path / 'config'
    config.write_text('[default]\n')
    monkeypatch.setenv('AWS_CONFIG_FILE', str(config))
    collect(account_of(user))
    collect(account_of(user))
    assert len(made) == 2
    config.write_text('[default]\nec2 =\n  use_fips_endpoint = false\n')
    collect(account_of(user))
    assert len(made) == 4
    collect(account_of(user))
    assert len(made) == 4


def test_a_client_idle_too_long_or_of_other_code_is_not_taken(aws, user, estate, sink, made, monkeypatch):
    collect(account_of(user))
    first = list(made)
    monkeypatch.setattr(auth, 'KEPT_CLIENT_IDLE', 0)
    collect(account_of(user))
    assert len(made) == 4 and all(c not in first for c in made[2:])
    monkeypatch.setattr(auth, 'KEPT_CLIENT_IDLE', 3600)
    # Another version of the modules (Func: pasted anew): its own clients.
    monkeypatch.setitem(auth._CODE_VERSION, 'digest', 'another version')
    collect(account_of(user))
    assert len(made) == 6
    collect(account_of(user))
    assert len(made) == 6


def test_a_run_that_times_out_keeps_no_client_not_even_the_identity_calls(aws, user, sink,
                                                                         monkeypatch):
    from blackhole import Blackhole
    hole = Blackhole()
    try:
        monkeypatch.setenv('AWS_ENDPOINT_URL_EC2', hole.url)
        before = set(kept())
        collector = ec2.DataCollector(account_of(user), {'regions': ['us-east-1']})
        api = {'title': 't', 'name': 'run', 'timeout': 2,
               'func': lambda: core.Runner(collector, force=True).run()}
        assert local_cli.run_api(api) == local_cli.EXIT_FAILED
    finally:
        hole.stop()
    assert set(kept()) == before


def test_a_collector_run_again_after_an_sts_outage_asks_again(aws, user, sink, monkeypatch):
    """The identity call failed (STS unreachable); the same collector run
    again once STS is back makes a new call and collects."""
    import socket
    closed = socket.socket()
    closed.bind(('127.0.0.1', 0))
    port = closed.getsockname()[1]
    closed.close()
    monkeypatch.setenv('AWS_ENDPOINT_URL_STS', f'http://127.0.0.1:{port}')
    monkeypatch.setenv('AWS_MAX_ATTEMPTS', '1')
    collector = ec2.DataCollector(account_of(user), {'regions': ['us-east-1']})
    with pytest.raises(core.RunFailed, match='sts:GetCallerIdentity'):
        core.Runner(collector, force=True).run()
    monkeypatch.delenv('AWS_ENDPOINT_URL_STS')
    assert core.Runner(collector, force=True).run()['ok']
