"""Every account of an AWS Organization from one startup script: moto with IAM
enforcement on, an Organization of a management account and three members
(one without the role, one with instances in two regions, one whose role
requires an ExternalId), and a proxy doing what moto leaves out: a role in
another account must exist and trust the caller's ExternalId."""
import collections
import datetime
import json
import re
import threading
import time
import urllib.parse

import pytest

import integration_aws_auth as auth
import integration_aws_cloudwatch__main as cw
import integration_aws_ec2__main as ec2
import integration_core__runner as core
from conftest import SSO_TOKEN, account_of, our_threads_left, reachable, sso_profile, unique
from integration_local.emulator import READ_POLICY
from org_estate import ACCESS_DENIED, EXTERNAL_ID, ORG_POLICY, REGIONS, ROLE, member_creds

def org_account(org, **extra):
    return account_of(org['user'], member_role_name=ROLE, member_external_id=EXTERNAL_ID, **extra)


def by_account(sink, measurement='aws_ec2'):
    out = {}
    for _, point in sink.points:
        if point['measurement'] == measurement:
            out.setdefault(point['tags']['AccountId'], []).append(point)
    return out


def test_one_script_collects_every_member_account(aws, org, sink, caplog):
    caplog.set_level('INFO', logger='integration')
    members = org['members']
    collector = ec2.DataCollector(org_account(org), {'regions': REGIONS})
    with aws.recording() as calls:
        with pytest.raises(core.RunFailed) as info:
            core.Runner(collector, force=True).run()
    points = by_account(sink)
    wanted = members['with-instances']
    assert sorted(p['tags']['name'] for p in points[wanted['id']]) == sorted(
        wanted['instances']['us-east-1'] + wanted['instances']['us-west-2'])
    assert {p['tags']['AccountName'] for p in points[wanted['id']]} == {wanted['name']}
    ext = members['external-id']
    assert [p['tags']['name'] for p in points[ext['id']]] == ext['instances']['us-east-1']
    assert members['without-role']['id'] not in points
    # One line for the broken account; the run fails after the others delivered.
    broken = members['without-role']['id']
    lines = [r.getMessage() for r in caplog.records]
    failed = [line for line in lines if 'FAILED' in line]
    assert len(failed) == 1 and f"account {broken} ({members['without-role']['name']}) FAILED: " \
        'sts:AssumeRole: AccessDenied' in failed[0]
    assert f'does the role exist in account {broken} and trust this caller' in failed[0]
    assert f'1 account(s) failed: {broken}' in str(info.value)
    # After every region line: Func keeps a long log's first and last
    # characters only (a hundred accounts' lines come before the regions').
    read = [i for i, line in enumerate(lines) if re.search(r'\d{12} us-[a-z]+-\d: \d+ instance', line)]
    assert len(read) == 6 and max(read) < lines.index(failed[0])
    for member in ('with-instances', 'external-id'):
        account_id = members[member]['id']
        assert any(f"account {account_id} ({members[member]['name']}) as arn:aws:sts::{account_id}:"
                   f"assumed-role/{ROLE}/Integration via member_role" in line for line in lines)
    # One identity line per account, the management account's included: the
    # credentials that list and open them have a line of their own.
    for account_id in [m['id'] for m in members.values()] + ['123456789012']:
        assert len([line for line in lines if f'account {account_id} ' in line]) == 1, (account_id, lines)
    assert f"[#1 AWS EC2] 4 account(s), through {org['user']['arn']} via access_key (aws)" in lines
    # Which identity made each call: the user's keys list the accounts and
    # assume the roles; each member's instances are read with its own session.
    user_key = org['user']['ak_id']
    assert {c['action'] for c in calls if c['access_key'] == user_key} >= {'ListAccounts', 'AssumeRole'}
    describes = {(org['proxy'].issued.get(c['access_key'], 'not a member session').split(':')[4], c['region'])
                 for c in calls if c['action'] == 'DescribeInstances'}
    assert describes == {(a, r) for a in (wanted['id'], ext['id'], '123456789012') for r in REGIONS}
    assume = [dict(urllib.parse.parse_qsl(c['url'].partition('?')[2])) or c['params']
              for c in calls if c['action'] == 'AssumeRole']
    assert all(a.get('ExternalId') == EXTERNAL_ID for a in assume)


def test_a_role_that_requires_an_external_id_not_given_says_which_key(aws, org, sink, caplog):
    caplog.set_level('INFO', logger='integration')
    ext = org['members']['external-id']
    account = account_of(org['user'], member_role_name=ROLE, member_accounts=[ext['id']])
    with pytest.raises(core.RunFailed):
        core.Runner(ec2.DataCollector(account, {'regions': REGIONS}), force=True).run()
    (line,) = failure_lines(caplog)
    assert line.startswith(f"[#1 AWS EC2] account {ext['id']} FAILED: sts:AssumeRole: AccessDenied")
    assert line.endswith(f"does the role exist in account {ext['id']} and trust this caller? If its trust "
                         "policy requires an ExternalId, set account['member_external_id']")


def test_a_second_run_makes_no_sts_call(aws, org, sink):
    account = org_account(org, exclude_accounts=[org['members']['without-role']['id']])
    core.Runner(ec2.DataCollector(account, {'regions': REGIONS}), force=True).run()
    first = len(sink.points)
    with aws.recording() as calls:
        core.Runner(ec2.DataCollector(account, {'regions': REGIONS}), force=True).run()
    assert [c['action'] for c in calls if c['service'] == 'sts'] == []
    assert len(sink.points) == 2 * first
    # The process's one model loader: a run's member sessions leave its
    # search path as they found it (boto3 adds a folder per session).
    paths = list(auth.process_shared().data['loader'].search_paths)
    core.Runner(ec2.DataCollector(account, {'regions': REGIONS}), force=True).run()
    assert auth.process_shared().data['loader'].search_paths == paths
    assert len(paths) == len(set(paths))


@pytest.mark.parametrize('keys', ['aws', 'aws-cn'])
def test_a_second_run_of_every_region_makes_no_sts_call(aws, org, sink, keys):
    """regions ['*'] names no partition: the keys tell it, by their identity,
    which is kept like the management keys' (China's keys not asked of the
    global partition first, every run)."""
    account = org_account(org, member_accounts=[org['members']['with-instances']['id']])
    if keys == 'aws-cn':
        cn = aws.make_user(unique('cn-org'), 'aws-cn', policy=ORG_POLICY)
        account.update(ak_id=cn['ak_id'], ak_secret=cn['ak_secret'])

    def run():
        with aws.recording() as calls:
            try:
                core.Runner([ec2.DataCollector(account, {'regions': ['*']}),
                             cw.DataCollector(account, {'regions': ['*']})], force=True).run()
            except core.RunFailed:
                assert keys == 'aws-cn'     # the member's role is the global partition's
        return calls
    run()
    calls = run()
    if keys == 'aws':
        assert [c['action'] for c in calls if c['service'] == 'sts'] == []
    assert not [c for c in calls if c['action'] == 'GetCallerIdentity' or
                keys == 'aws-cn' and c['region'] == 'us-east-1']


def test_a_check_between_runs_keeps_what_the_runs_learned_of_the_sessions(aws, org, sink, monkeypatch):
    """check takes the kept member sessions and gives them back: a session
    denied after it worked is still replaced in the next run."""
    from servers import ec2_error
    target = org['members']['with-instances']['id']
    proxy, judge = org['proxy'], org['proxy'].rule
    account = org_account(org, member_accounts=[target])
    core.Runner(ec2.DataCollector(account, {'regions': REGIONS}), force=True).run()
    revoked = {key for key, arn in proxy.issued.items() if arn.split(':')[4] == target}
    proxy.rule = lambda r: ('status', 403, ec2_error('UnauthorizedOperation', 'explicit deny')) \
        if r['access_key'] in revoked and r['action'] == 'DescribeInstances' else judge(r)
    monkeypatch.setitem(core._RUNTIME, 'mode', 'check')
    core.Runner(ec2.DataCollector(account, {'regions': REGIONS})).run()
    monkeypatch.setitem(core._RUNTIME, 'mode', 'run')
    with aws.recording() as calls:
        core.Runner(ec2.DataCollector(account, {'regions': REGIONS}), force=True).run()
    assert len([c for c in calls if c['action'] == 'AssumeRole']) == 1


def test_an_account_whose_every_region_refuses_any_session_is_not_reopened_every_run(aws, org, sink, caplog):
    """Its only region an opt-in one it has not enabled (AuthFailure, to any
    session): a new session once, then none, and one line each run."""
    from servers import ec2_error
    caplog.set_level('INFO', logger='integration')
    target = org['members']['with-instances']['id']
    proxy, judge = org['proxy'], org['proxy'].rule
    proxy.rule = lambda r: ('status', 401, ec2_error('AuthFailure', 'AWS was not able to validate the '
                                                     'provided access credentials')) \
        if f':{target}:' in proxy.issued.get(r['access_key'], '') and r['service'] == 'ec2' else judge(r)
    account = org_account(org, member_accounts=[target, org['members']['external-id']['id']])
    assumed, lines = [], []
    for _ in range(4):
        caplog.clear()
        with aws.recording() as calls:
            with pytest.raises(core.RunFailed):
                core.Runner(ec2.DataCollector(account, {'regions': [REGIONS[0]]}), force=True).run()
        assumed.append(len([c for c in calls if c['action'] == 'AssumeRole']))
        lines.append(len(failure_lines(caplog)))
    assert assumed[2:] == [0, 0] and lines[2:] == [1, 1], (assumed, lines)


def test_a_region_a_policy_denies_costs_no_new_session_in_any_script(aws, org, sink):
    """A service control policy denies one region. One script reads it and
    another region, another script that region alone, with the same keys and
    role: the denied region never worked, so neither script's runs replace
    its session (an AssumeRole per run); nor does a script with another role."""
    from servers import ec2_error
    members, proxy = org['members'], org['proxy']
    target = members['with-instances']['id']
    judge = proxy.rule
    proxy.rule = lambda request: ('status', 403, ec2_error('UnauthorizedOperation', 'explicit deny in a '
                                                           'service control policy')) \
        if request['action'] == 'DescribeInstances' and request['region'] == 'us-west-2' and \
        f':{target}:' in proxy.issued.get(request['access_key'], '') else judge(request)
    both = org_account(org, member_accounts=[target])
    other_role = dict(both, member_role_name=ROLE + '-other')
    assumed = []
    for _ in range(4):
        seen = len(proxy.seen)
        for account, regions in ((both, ['us-west-2', 'us-east-1']), (both, ['us-west-2']),
                                 (other_role, ['us-west-2'])):
            with pytest.raises(core.RunFailed):
                core.Runner(ec2.DataCollector(account, {'regions': regions}), force=True).run()
        assumed.append(len([r for r in proxy.seen[seen:] if r['action'] == 'AssumeRole']))
    # The first run opens the sessions; then only the other role is asked
    # again, each run (it does not exist: refused, its account's one line).
    assert assumed[1:] == [1, 1, 1], assumed


def test_failure_lines_of_every_collector_come_last(aws, org, sink, caplog):
    """EC2 and CloudWatch in one Runner: the failures of both come after
    every region line of both (Func keeps a long log's head and tail only)."""
    caplog.set_level('INFO', logger='integration')
    account = org_account(org)
    with pytest.raises(core.RunFailed):
        core.Runner([ec2.DataCollector(account, {'regions': REGIONS}),
                     cw.DataCollector(account, {'regions': REGIONS})], force=True).run()
    lines = [r.getMessage() for r in caplog.records]
    failed = [i for i, line in enumerate(lines) if 'FAILED' in line]
    read = [i for i, line in enumerate(lines) if re.search(r'\d{12} us-[a-z]+-\d: ', line)]
    assert len(failed) == 2 and read and max(read) < min(failed), lines
    assert lines[-1].startswith('[Runner] done')


def test_check_of_a_collector_that_ran_asks_with_checks_own_cancellation(aws, user):
    collector = ec2.DataCollector(account_of(user), {'regions': ['*']})
    core.Runner(collector, force=True, debug=True).run()
    rows = collector.check()
    assert rows and all(row['ok'] for row in rows), rows


def test_a_second_run_takes_the_member_sessions_of_the_first(aws, org, sink, monkeypatch):
    """A member account's Session (3-4 ms of CPU to make, per account and
    run) is made once per process: the next run of the same keys takes it
    back with that run's credentials. While kept it holds none, and a
    collector of other operations never takes it."""
    members = org['members']
    account = org_account(org, exclude_accounts=[members['without-role']['id']])
    opened = {}
    member_session = auth.member_session

    def recording(management, account, member_id, **kwargs):
        session = member_session(management, account, member_id, **kwargs)
        opened[member_id] = (session, session.get_credentials().get_frozen_credentials())
        return session
    monkeypatch.setattr(auth, 'member_session', recording)

    def run(collector=ec2.DataCollector):
        opened.clear()
        core.Runner(collector(account, {'regions': REGIONS}), force=True).run()
        return dict(opened)
    first = run()
    assert sorted(first) == sorted([members['with-instances']['id'], members['external-id']['id'],
                                    '123456789012'])     # the management account: it has the role
    kept = [entry[1] for entry in kept_sessions().values()]
    for session, _ in first.values():
        assert any(session is other for other in kept)
        assert session._session._credentials is None and session.integration_binding is None
    secrets = [org['user']['ak_secret']] + [s for _, c in first.values() for s in (c.secret_key, c.token)]
    assert reachable(auth.process_shared().data, secrets) == []
    points = len(sink.points)
    with aws.recording() as calls:
        second = run()
    assert all(second[member][0] is first[member][0] for member in first)
    assert all(second[member][1].access_key == first[member][1].access_key for member in first)
    assert len(sink.points) == 2 * points
    assert {org['proxy'].issued.get(c['access_key'], 'not a member session').split(':')[4]
            for c in calls if c['action'] == 'DescribeInstances'} == set(first)
    metrics = run(cw.DataCollector)
    assert sorted(metrics) == sorted(first)
    assert not any(metrics[member][0] is first[member][0] for member in first)


def kept_sessions():
    return auth.process_shared().data.setdefault('kept_sessions.v1', collections.OrderedDict())


@pytest.fixture
def no_kept_sessions():
    """The process's kept member sessions, those of earlier tests left out."""
    kept_sessions().clear()


def test_kept_member_sessions_are_bounded_the_latest_kept(aws, org, sink, monkeypatch, no_kept_sessions):
    monkeypatch.setattr(auth, 'KEPT_SESSIONS', 1)
    account = org_account(org, exclude_accounts=[org['members']['without-role']['id']])
    opened = {}
    member_session = auth.member_session

    def recording(management, account, member_id, **kwargs):
        opened[member_id] = member_session(management, account, member_id, **kwargs)
        return opened[member_id]
    monkeypatch.setattr(auth, 'member_session', recording)
    core.Runner(ec2.DataCollector(account, {'regions': REGIONS}), force=True).run()
    # Given back in the accounts' order, the oldest dropped first.
    (_, last), = kept_sessions().values()
    assert len(opened) == 3 and last is opened[max(opened)]


def test_a_kept_member_session_is_taken_by_its_own_member_base_collector_and_sdk(
        aws, org, monkeypatch, no_kept_sessions):
    """The key of a kept session: the member, the management credentials'
    source, the collector's operations and timestamps, the SDK's settings.
    A taken session is out of the store until given back."""
    account = org_account(org)
    management = auth.get_session(account, region=REGIONS[0])
    member = org['members']['with-instances']['id']

    def take(base=management, member_id=member, **options):
        options = dict({'operations': ec2.OPERATIONS, 'text_timestamps': True}, **options)
        return auth.member_session(base, account, member_id, **options)
    kept = take()
    auth.keep_member_sessions([kept])
    again = take()
    assert again is kept and kept_sessions() == {}
    assert take() is not kept, 'a session in use was taken again'
    assert again.get_credentials() is not None and again.integration_binding.key[:2] == ('member', member)

    other_keys = auth.get_session(account, region=REGIONS[0])
    other_keys.integration_binding = auth._Binding(
        ('keys', 'other-management-key-id', 'a digest'), management.integration_binding.seal_keys, None, False)
    different = {
        'another member': lambda: take(member_id=org['members']['external-id']['id']),
        'other management keys': lambda: take(other_keys),
        'other operations': lambda: take(operations=None),
        'datetimes': lambda: take(text_timestamps=False),
        'another SDK setting': lambda: monkeypatch.setenv('AWS_MAX_ATTEMPTS', '7') or take(),
    }
    for what, make in different.items():
        kept = take()
        auth.keep_member_sessions([kept])
        assert make() is not kept, what
        assert [session for _, session in kept_sessions().values()] == [kept], \
            f'{what}: the kept session was taken'
        kept_sessions().clear()


def test_kept_member_sessions_hold_no_secret_of_the_sdks_files(aws, org, sink, monkeypatch, tmp_path,
                                                             no_kept_sessions):
    """The management keys from the credentials file (the default chain) and
    an SSO profile's bearer token: a member session reads both (every client
    it makes loads the token); kept, it holds neither, and the next run's
    sessions read them again. Nor do the region tables, made by a session
    that read the same files."""
    credentials = tmp_path / 'credentials'
    credentials.write_text(f"[default]\naws_access_key_id = {org['user']['ak_id']}\n"
                           f"aws_secret_access_key = {org['user']['ak_secret']}\n")
    monkeypatch.setenv('AWS_SHARED_CREDENTIALS_FILE', str(credentials))
    sso_profile(tmp_path, monkeypatch)
    account = {'member_role_name': ROLE, 'member_external_id': EXTERNAL_ID,
               'exclude_accounts': [org['members']['without-role']['id']]}
    # The region tables, made again under these files: they are kept too.
    auth.process_shared().data.pop('regions', None)
    for _ in range(2):
        core.Runner(ec2.DataCollector(account, {'regions': REGIONS}), force=True).run()
        assert len(kept_sessions()) == 3
        assert reachable(auth.process_shared().data, [org['user']['ak_secret'], SSO_TOKEN]) == []
    assert {p['tags']['AccountId'] for _, p in sink.points} >= {
        org['members']['with-instances']['id'], org['members']['external-id']['id']}


def test_an_account_created_between_runs_is_picked_up(aws, org, sink, emulator):
    account = org_account(org, exclude_accounts=[org['members']['without-role']['id']])
    core.Runner(ec2.DataCollector(account, {'regions': REGIONS}), force=True).run()
    emulator.enforce(False)
    try:
        admin = emulator.client('organizations', 'us-east-1')
        new = admin.create_account(Email='new@example.com', AccountName=unique('new'))['CreateAccountStatus']
        creds = member_creds(emulator, new['AccountId'])
        iam = emulator.client('iam', 'us-east-1', creds)
        iam.create_role(RoleName=ROLE, AssumeRolePolicyDocument=json.dumps({
            'Version': '2012-10-17', 'Statement': [
                {'Effect': 'Allow', 'Principal': {'AWS': org['user']['arn']}, 'Action': 'sts:AssumeRole'}]}))
        iam.put_role_policy(RoleName=ROLE, PolicyName='p', PolicyDocument=json.dumps(READ_POLICY))
        instance = emulator.client('ec2', 'us-west-2', creds).run_instances(
            ImageId='ami-12c6146b', MinCount=1, MaxCount=1)['Instances'][0]['InstanceId']
    finally:
        emulator.enforce()
    # The session's Organization has it now: later tests (and the proxy) know its role.
    org['roles'][f"arn:aws:iam::{new['AccountId']}:role/{ROLE}"] = None
    org['proxy'].roles[f"arn:aws:iam::{new['AccountId']}:role/{ROLE}"] = None
    sink.points.clear()
    core.Runner(ec2.DataCollector(account, {'regions': REGIONS}), force=True).run()
    assert [p['tags']['name'] for p in by_account(sink)[new['AccountId']]] == [instance]


def test_the_skip_rule_is_kept_per_account(aws, org, sink, caplog):
    """A second run 5 minutes later collects only what the first could not."""
    caplog.set_level('INFO', logger='integration')
    members = org['members']
    now = [1_800_000_000.0]

    def run():
        collector = ec2.DataCollector(org_account(org), {'regions': REGIONS})
        with pytest.raises(core.RunFailed):
            core.Runner(collector, clock=lambda: now[0]).run()
    run()
    failed_first = sorted(re.search(r'account (\d{12})', r.getMessage()).group(1)
                          for r in caplog.records if 'FAILED' in r.getMessage())
    assert members['without-role']['id'] in failed_first
    now[0] += 300
    caplog.clear()
    org['proxy'].seen.clear()
    with aws.recording() as calls:
        run()
    lines = [r.getMessage() for r in caplog.records]
    for label in ('with-instances', 'external-id'):
        assert any(f"account {members[label]['id']} ({members[label]['name']}) skipped: the last "
                   'collection started 300 s ago, under 900 s' in line for line in lines)
    broken = members['without-role']['id']
    assert any(f'account {broken}' in line and 'FAILED' in line for line in lines)
    # Only the account that failed is tried again (the proxy refused its
    # AssumeRole before moto saw it); nothing of the fresh accounts is read.
    assumed = sorted(dict(urllib.parse.parse_qsl(r['body'].decode()))['RoleArn']
                     for r in org['proxy'].seen if r['action'] == 'AssumeRole')
    assert assumed == [f'arn:aws:iam::{a}:role/{ROLE}' for a in failed_first]
    assert [c for c in calls if c['action'] == 'DescribeInstances'] == []



def test_selecting_other_accounts_keeps_the_skip_rule_of_those_collected(aws, org, sink, caplog):
    """Editing exclude_accounts or member_accounts changes which accounts are
    collected, not what an account's collection is: the accounts collected 5
    minutes ago are still skipped."""
    caplog.set_level('INFO', logger='integration')
    members = org['members']
    now = [1_800_100_000.0]
    broken = members['without-role']['id']

    def run(**selection):
        collector = ec2.DataCollector(org_account(org, **selection), {'regions': REGIONS})
        core.Runner(collector, clock=lambda: now[0]).run()
    with pytest.raises(core.RunFailed):
        run()
    for selection in ({'exclude_accounts': [broken]},
                      {'member_accounts': [members['with-instances']['id'], members['external-id']['id']]}):
        now[0] += 100
        caplog.clear()
        with aws.recording() as calls:
            run(**selection)
        lines = [r.getMessage() for r in caplog.records]
        for label in ('with-instances', 'external-id'):
            assert any(f"account {members[label]['id']}" in line and 'skipped: the last collection started'
                       in line for line in lines), (selection, lines)
        assert [c for c in calls if c['action'] in ('DescribeInstances', 'AssumeRole')] == []



def test_an_exclusion_that_excludes_nothing_and_an_empty_selection_are_said(aws, org, sink, caplog):
    caplog.set_level('INFO', logger='integration')
    members = org['members']
    aws.enforce(False)
    try:        # other tests may have added accounts
        every = [a['Id'] for a in aws.client('organizations', 'us-east-1').list_accounts()['Accounts']]
    finally:
        aws.enforce()
    core.Runner(ec2.DataCollector(org_account(org, exclude_accounts=every + ['999999999999']),
                                  {'regions': REGIONS}), force=True).run()
    warnings = [r.getMessage() for r in caplog.records if r.levelname == 'WARNING']
    assert warnings == [
        "[AWS EC2] account['exclude_accounts'] names 999999999999, not an account of the Organization "
        '(organizations:ListAccounts): check the id(s)',
        "[AWS EC2] no account to collect: the Organization (organizations:ListAccounts) has none that "
        "account['exclude_accounts'] leaves"], warnings
    assert sink.points == []
    assert f"[#1 AWS EC2] 0 account(s), through {org['user']['arn']} via access_key (aws)" in [
        r.getMessage() for r in caplog.records]
    # Beside member_accounts: an id it does not list excludes nothing either.
    caplog.clear()
    listed = members['external-id']['id']
    core.Runner(ec2.DataCollector(org_account(org, member_accounts=[listed], exclude_accounts=['999999999999']),
                                  {'regions': REGIONS}), force=True).run()
    warnings = [r.getMessage() for r in caplog.records if r.levelname == 'WARNING']
    assert warnings == [
        "[AWS EC2] account['exclude_accounts'] names 999999999999, not an account of "
        "account['member_accounts']: check the id(s)"], warnings
    assert {p['tags']['AccountId'] for _, p in sink.points} == {listed}
    # An empty exclusion (a template's) excludes nothing, and says nothing.
    caplog.clear()
    with pytest.raises(core.RunFailed):         # the member without the role
        core.Runner(ec2.DataCollector(org_account(org, exclude_accounts=[]), {'regions': REGIONS}),
                    force=True).run()
    assert not [r for r in caplog.records if r.levelname == 'WARNING']
    assert set(by_account(sink)) >= {members['with-instances']['id'], members['external-id']['id']}
    # A new member session's line names its account.
    assert any(f"obtained a new member_role session for account {members['with-instances']['id']}"
               in r.getMessage() for r in caplog.records)


def test_listed_accounts_need_no_organizations_call(aws, org, sink):
    wanted = org['members']['with-instances']
    account = org_account(org, member_accounts=[wanted['id']])
    with aws.recording() as calls:
        core.Runner(ec2.DataCollector(account, {'regions': REGIONS}), force=True).run()
    assert 'ListAccounts' not in [c['action'] for c in calls]
    points = by_account(sink)
    assert list(points) == [wanted['id']]
    assert all('AccountName' not in p['tags'] for p in points[wanted['id']]), 'the name is not known'


def test_role_chaining_from_a_role_asks_for_an_hour(aws, org, sink):
    """With assume_role_arn, that role is assumed first, then the members'
    from it: AWS caps chained sessions at 1 hour."""
    mgmt_role = aws.make_role(unique('hub'), org['user']['arn'], 'aws', policy=ORG_POLICY)
    wanted = org['members']['with-instances']
    org['proxy'].roles[f"arn:aws:iam::{wanted['id']}:role/{ROLE}"] = None
    account = org_account(org, assume_role_arn=mgmt_role, member_accounts=[wanted['id']])
    with aws.recording() as calls:
        core.Runner(ec2.DataCollector(account, {'regions': REGIONS}), force=True).run()
    assumes = [c for c in calls if c['action'] == 'AssumeRole']
    member = [c for c in assumes if c['params'].get('RoleArn', '').endswith(f'{wanted["id"]}:role/{ROLE}')]
    assert member and all(int(c['params']['DurationSeconds']) <= 3600 for c in member)
    assert all(c['token'] for c in member), 'the member role is assumed with the hub role session'
    assert len(by_account(sink)[wanted['id']]) == 3


def test_keys_from_the_environment_are_no_role_chaining(aws, org, sink, monkeypatch):
    """Long-term keys from the environment (no ak_id: botocore's default
    chain) are not a session: the member roles are asked for as long as the
    account's own keys would ask (43200 s), not capped at an hour."""
    wanted = org['members']['with-instances']
    monkeypatch.setenv('AWS_ACCESS_KEY_ID', org['user']['ak_id'])
    monkeypatch.setenv('AWS_SECRET_ACCESS_KEY', org['user']['ak_secret'])
    monkeypatch.delenv('AWS_SESSION_TOKEN', raising=False)
    account = {'member_role_name': ROLE, 'member_external_id': EXTERNAL_ID, 'member_accounts': [wanted['id']]}
    with aws.recording() as calls:
        core.Runner(ec2.DataCollector(account, {'regions': REGIONS}), force=True).run()
    member = [c for c in calls if c['action'] == 'AssumeRole']
    assert member and [int(c['params']['DurationSeconds']) for c in member] == [43200]
    assert len(by_account(sink)[wanted['id']]) == 3


def test_cloudwatch_covers_every_member_account(aws, org, sink):
    import datetime
    import time
    wanted = org['members']['with-instances']
    now = int(time.time())
    end = (now - 600) // 300 * 300
    instance = wanted['instances']['us-east-1'][0]
    aws.enforce(False)
    try:
        aws.client('cloudwatch', 'us-east-1', member_creds(aws, wanted['id'])).put_metric_data(
            Namespace='AWS/EC2', MetricData=[{
                'MetricName': 'CPUUtilization', 'Dimensions': [{'Name': 'InstanceId', 'Value': instance}],
                'Timestamp': datetime.datetime.fromtimestamp(end - 250, datetime.timezone.utc),
                'Value': 42.0}])
    finally:
        aws.enforce()
    account = org_account(org, member_accounts=[wanted['id']])
    core.Runner([ec2.DataCollector(account, {'regions': REGIONS}),
                 cw.DataCollector(account, {'regions': REGIONS}, now=lambda: now)], force=True).run()
    metrics = by_account(sink, 'aws_AWS/EC2')[wanted['id']]
    point = next(p for p in metrics if p['tags']['InstanceId'] == instance)
    assert point['fields']['CPUUtilization_Average'] == 42.0
    assert point['tags']['AccountId'] == wanted['id'] and point['tags']['InstanceType']


def test_cloudwatch_series_of_an_account_alone_and_of_the_organization_each_get_every_bucket(
        aws, org, sink):
    """A script of one member account alone (the user's page) and the
    Organization's scripts, listing it or naming it, write different series
    (AccountId, AccountName among the tags or not) of the same metrics: each
    has its own record of the buckets written, so none takes another's."""
    import datetime
    import time
    wanted = org['members']['with-instances']
    instance = wanted['instances']['us-west-2'][0]
    now = float(int(time.time()) // 300 * 300 + 17)
    aws.enforce(False)
    try:
        aws.client('cloudwatch', 'us-west-2', member_creds(aws, wanted['id'])).put_metric_data(
            Namespace='AWS/EC2', MetricData=[{
                'MetricName': 'CPUUtilization', 'Dimensions': [{'Name': 'InstanceId', 'Value': instance}],
                'Timestamp': datetime.datetime.fromtimestamp(now - 850 - 300 * k, datetime.timezone.utc),
                'Value': 40.0 + k} for k in range(3)])
    finally:
        aws.enforce()
    scripts = {
        'alone': account_of(org['user'], assume_role_arn=f"arn:aws:iam::{wanted['id']}:role/{ROLE}"),
        'named': org_account(org, member_accounts=[wanted['id']]),
        'listed': org_account(org, exclude_accounts=[m['id'] for m in org['members'].values()
                                                     if m is not wanted] + ['123456789012']),
    }
    written = {}
    for name, account in scripts.items():
        sink.points.clear()
        core.Runner(cw.DataCollector(account, {'regions': ['us-west-2']}, now=lambda: now),
                    force=True).run()
        written[name] = sorted((p['timestamp'], p['tags'].get('AccountId'), p['tags'].get('AccountName'))
                               for p in sink.metrics() if p['tags'].get('InstanceId') == instance)
    stamps = [t for t, _, _ in written['alone']]
    assert len(stamps) == 3
    assert written['alone'] == [(t, None, None) for t in stamps]
    assert written['named'] == [(t, wanted['id'], None) for t in stamps]
    assert written['listed'] == [(t, wanted['id'], wanted['name']) for t in stamps]


def test_check_has_a_row_per_account_and_region(aws, org):
    rows = ec2.DataCollector(org_account(org), {'regions': REGIONS}).check()
    members = org['members']
    by_label = {row['region']: row for row in rows}
    for label in ('with-instances', 'external-id'):
        for region in REGIONS:
            assert by_label[f"{members[label]['id']} {region}"]['ok']
    assert not by_label[members['without-role']['id']]['ok']
    assert by_label[members['without-role']['id']]['reason'].startswith(
        f"({members['without-role']['name']}) sts:AssumeRole: AccessDenied")
    assert not by_label[members['without-role']['id']].get('skipped')
    # Left out by design, and said so: the management account (its role is
    # there in this estate; refused, it is a skipped row, not an OK one).
    assert by_label['123456789012 us-east-1']['ok'] and not by_label['123456789012 us-east-1'].get('skipped')


BAD = [
    ({'member_external_id': 'x' * 10}, "account['member_external_id'] is set but account['member_role_name'] is missing"),
    # The member roles' ExternalId under the single role's key: the right key said.
    ({'member_role_name': 'r', 'external_id': 'x' * 10}, "account['external_id'] is set but "
     "account['assume_role_arn'] is missing: the member roles' ExternalId is account['member_external_id']: "
     'rename the key; add the role to assume, or remove this key'),
    ({'member_role_name': 'arn:aws:iam::111122223333:role/r'}, "account['member_role_name'] must be a role name"),
    ({'member_role_name': 'r', 'member_accounts': '111122223333'}, "account['member_accounts'] must be a non-empty list"),
    ({'member_role_name': 'r', 'member_accounts': [111122223333]}, "account['member_accounts'][0] must be a 12-digit account id in quotes"),
    ({'member_role_name': 'r', 'exclude_accounts': ['1234']}, "account['exclude_accounts'][0] must be a 12-digit account id"),
    ({'member_role_name': 'r', 'member_accounts': ['111122223333', '111122223333']}, 'lists 111122223333 a second time'),
    ({'member_role_name': 'r', 'extra_tags': {'AccountId': 'x'}}, "account['extra_tags']['AccountId'] would overwrite"),
    # Full-width digits (an input method's): AWS's ids are ASCII. Excluded,
    # such an id would quietly exclude nothing.
    ({'member_role_name': 'r', 'member_accounts': ['１１１１２２２２３３３３']},
     "account['member_accounts'][0] must be a 12-digit account id in quotes, e.g. '111122223333', digits 0-9 only (got １１１１２２２２３３３３)"),
    ({'member_role_name': 'r', 'exclude_accounts': ['１１１１２２２２３３３３']},
     "account['exclude_accounts'][0] must be a 12-digit account id in quotes, e.g. '111122223333', digits 0-9 only (got １１１１２２２２３３３３)"),
    ({'member_role_name': 'réader'}, "account['member_role_name'] must be a role name (1-64 characters of ASCII letters"),
    ({'member_role_name': 'role/reader'},
     "account['member_role_name'] is 'role/reader': give the role's name without 'role/', 'reader' (the role is "
     "assumed as arn:<partition>:iam::<member id>:role/<member_role_name>)"),
    # Blank, the role name would quietly collect the one account.
    ({'member_role_name': ''}, "account['member_role_name'] is empty: name the role to assume in every member account"),
    ({'member_role_name': '   ', 'member_accounts': ['111122223333']}, "account['member_role_name'] is empty"),
]


@pytest.mark.parametrize('extra,expected', BAD, ids=[e for _, e in BAD])
def test_a_bad_organization_key_is_one_line_before_any_call(aws, extra, expected):
    account = dict({'ak_id': 'AKIAEXAMPLEEXAMPLE01', 'ak_secret': 'x' * 40}, **extra)
    with aws.recording() as calls:
        with pytest.raises(core.ConfigError) as info:
            ec2.DataCollector(account, {'regions': ['us-east-1']})
    assert expected in str(info.value) and '\n' not in str(info.value)
    assert calls == []


def test_the_management_account_without_the_role_costs_no_sts_call_between_hourly_checks(
        aws, org, sink, caplog):
    """The management account is collected only when the role exists there,
    and service-managed StackSets leave it out: steady state must still ask
    STS nothing. Its refusal is kept an hour, then asked again."""
    caplog.set_level('INFO', logger='integration')
    management_role = f'arn:aws:iam::123456789012:role/{ROLE}'
    cross_account = org['proxy'].rule

    def rule(request):
        if request['service'] == 'sts' and request['action'] == 'AssumeRole' and dict(
                urllib.parse.parse_qsl(request['body'].decode())).get('RoleArn') == management_role:
            return ('status', 403, ACCESS_DENIED.format(caller='the caller', role=management_role))
        return cross_account(request)
    org['proxy'].rule = rule
    account = org_account(org, exclude_accounts=[org['members']['without-role']['id']])
    now = [datetime.datetime.now(datetime.timezone.utc)]

    def run():
        caplog.clear()
        org['proxy'].seen.clear()
        with aws.recording() as calls:
            core.Runner(ec2.DataCollector(account, {'regions': REGIONS}, clock=lambda: now[0]),
                        force=True).run()
        skipped = [r.getMessage() for r in caplog.records
                   if 'account 123456789012' in r.getMessage() and 'skipped' in r.getMessage()]
        assumed = [dict(urllib.parse.parse_qsl(r['body'].decode()))['RoleArn']
                   for r in org['proxy'].seen if r['action'] == 'AssumeRole']
        return calls, skipped, assumed
    calls, skipped, assumed = run()
    assert management_role in assumed
    assert len(skipped) == 1 and f"skipped: the management account: its role '{ROLE}' cannot be " \
        'assumed (sts:AssumeRole: AccessDenied' in skipped[0]
    first = len(sink.points)
    assert first and '123456789012' not in by_account(sink)
    # The next run, 15 minutes later: the same line, and not one STS call.
    now[0] += datetime.timedelta(minutes=15)
    calls, skipped, assumed = run()
    assert [c['action'] for c in calls if c['service'] == 'sts'] == [] and assumed == []
    assert len(skipped) == 1 and 'cannot be assumed (sts:AssumeRole: AccessDenied' in skipped[0] \
        and '; asked again after ' in skipped[0]
    assert len(sink.points) == 2 * first
    # An hour after the refusal: asked again (the role may exist by now).
    now[0] += datetime.timedelta(minutes=46)
    calls, skipped, assumed = run()
    assert management_role in assumed and len(skipped) == 1 and 'asked again' not in skipped[0]
    # The record is sealed with the management keys (the cache is shared):
    # a plain one counts as absent, and one naming a member, however made,
    # does not skip that member.
    collector = ec2.DataCollector(account, {'regions': REGIONS}, clock=lambda: now[0])
    key, cache = collector.aws._refusal_key(), core.default_cache()
    assert cache.get(key).startswith(auth.SEALED_PREFIX) and '123456789012' not in cache.get(key)
    member = org['members']['with-instances']['id']
    for planted in (json.dumps({'account_id': member, 'skipped': 'planted', 'checked': auth._format_time(now[0])}),
                    auth._seal(auth._seal_keys(org['user']['ak_secret']), json.dumps(
                        {'account_id': member, 'skipped': 'planted', 'checked': auth._format_time(now[0])}))):
        cache.set(key, planted, expire=3600)
        sink.points.clear()
        calls, skipped, assumed = run()
        assert member in by_account(sink) and not any('planted' in r.getMessage() for r in caplog.records)
        assert any('counts as absent' in r.getMessage() for r in caplog.records)
    # check asks AWS whatever a run found.
    org['proxy'].seen.clear()
    rows = ec2.DataCollector(account, {'regions': REGIONS}, clock=lambda: now[0]).check()
    (row,) = [r for r in rows if r['region'] == '123456789012']
    assert row['ok'] and row['skipped'] and 'skipped: the management account' in row['reason']
    assert management_role in [dict(urllib.parse.parse_qsl(r['body'].decode()))['RoleArn']
                               for r in org['proxy'].seen if r['action'] == 'AssumeRole']
    # The role made there, check says so: the runs after it collect the
    # management account at once, not after the hour.
    org['proxy'].rule = cross_account
    rows = ec2.DataCollector(account, {'regions': REGIONS}, clock=lambda: now[0]).check()
    assert all(r['ok'] for r in rows if r['region'] in ('123456789012 ' + region for region in REGIONS))
    calls, skipped, assumed = run()     # with the session check opened (kept: no AssumeRole)
    assert skipped == []
    assert any('account 123456789012' in r.getMessage() and
               f'as arn:aws:sts::123456789012:assumed-role/{ROLE}/' in r.getMessage() for r in caplog.records)


def failure_lines(caplog):
    return [r.getMessage() for r in caplog.records if r.levelname in ('WARNING', 'ERROR')]


@pytest.mark.parametrize('collector', [ec2.DataCollector, cw.DataCollector])
def test_keys_aws_refuses_are_one_line_from_the_identity_call(aws, org, sink, caplog, collector):
    """The accounts are listed while the identity call runs; keys AWS refuses
    still cost one line, the identity call's, and no member role is tried."""
    caplog.set_level('INFO', logger='integration')
    account = org_account(org)
    account['ak_secret'] = 'y' * 40
    with aws.recording() as calls:
        with pytest.raises(core.RunFailed) as info:
            core.Runner(collector(account, {'regions': REGIONS}), force=True).run()
    lines = failure_lines(caplog)
    assert len(lines) == 1 and 'FAILED: account: AuthError: sts:GetCallerIdentity: SignatureDoesNotMatch' in lines[0]
    assert 'sts:GetCallerIdentity: SignatureDoesNotMatch' in str(info.value)
    assert not [c for c in calls if c['action'] in ('AssumeRole', 'DescribeInstances', 'ListMetrics')]
    # Asked once: the Runner and the accounts' listing both get its answer.
    assert [c['action'] for c in calls if c['service'] == 'sts'] == ['GetCallerIdentity']
    assert sink.points == []


def test_keys_that_may_not_list_the_organization_are_one_line_saying_what_to_do(aws, org, sink, caplog):
    caplog.set_level('INFO', logger='integration')
    from integration_local.emulator import USER_POLICY
    user = aws.make_user(unique('nolist'), 'aws', policy=USER_POLICY)
    account = account_of(user, member_role_name=ROLE, member_external_id=EXTERNAL_ID)
    with aws.recording() as calls:
        with pytest.raises(core.RunFailed):
            core.Runner(ec2.DataCollector(account, {'regions': REGIONS}), force=True).run()
    lines = failure_lines(caplog)
    assert len(lines) == 1, lines
    assert 'organizations:ListAccounts: AccessDenied' in lines[0]
    assert "list the accounts in account['member_accounts'], or use the management account" in lines[0]
    assert not [c for c in calls if c['action'] in ('AssumeRole', 'DescribeInstances')]
    assert sink.points == []



def test_check_with_keys_that_may_not_list_the_organization_is_a_row_not_a_traceback(
        aws, org, monkeypatch, capsys):
    from integration_local.emulator import USER_POLICY
    user = aws.make_user(unique('nolist'), 'aws', policy=USER_POLICY)
    account = account_of(user, member_role_name=ROLE, member_external_id=EXTERNAL_ID)
    monkeypatch.setitem(core._RUNTIME, 'mode', 'check')
    result = core.Runner(ec2.DataCollector(account, {'regions': REGIONS})).run()
    out = capsys.readouterr().out
    assert not result['ok'] and 'Traceback' not in out
    rows = [line.split(None, 3) for line in out.splitlines()]
    assert [r[:3] for r in rows] == [['#1', 'identity', 'OK'], ['#1', 'accounts', 'FAIL']], out
    assert rows[1][3].startswith('organizations:ListAccounts: AccessDenied')
    assert "list the accounts in account['member_accounts']" in rows[1][3]



def test_from_a_delegated_administrator_the_management_account_is_the_organizations(
        aws, org, sink, caplog):
    """The credentials in use are a role in a member account (a delegated
    administrator): the account whose refused role is skipped as the
    management account's is DescribeOrganization's, not the caller's own."""
    caplog.set_level('INFO', logger='integration')
    members = org['members']
    delegated = members['with-instances']['id']
    aws.enforce(False)
    try:
        iam = aws.client('iam', 'us-east-1', member_creds(aws, delegated))
        admin_role = iam.create_role(RoleName=unique('delegated-admin'), AssumeRolePolicyDocument=json.dumps({
            'Version': '2012-10-17', 'Statement': [{'Effect': 'Allow', 'Principal': {'AWS': org['user']['arn']},
                                                    'Action': 'sts:AssumeRole'}]}))['Role']
        iam.put_role_policy(RoleName=admin_role['RoleName'], PolicyName='p', PolicyDocument=json.dumps(ORG_POLICY))
        listing = aws.client('organizations', 'us-east-1').list_accounts()['Accounts']
    finally:
        aws.enforce()
    org['proxy'].roles[admin_role['Arn']] = None
    refused = {f'arn:aws:iam::123456789012:role/{ROLE}', f'arn:aws:iam::{delegated}:role/{ROLE}'}
    asked = []
    judge = org['proxy'].rule

    def rule(request):
        # moto answers Organizations only to the management account: as AWS
        # does to a delegated administrator, the proxy answers for it.
        if org['proxy'].issued.get(request['access_key']) == admin_role['Arn']:
            if request['action'] in ('ListAccounts', 'DescribeOrganization'):
                asked.append(request['action'])
                return ('status', 200, json.dumps(
                    {'Accounts': [{k: a[k] for k in ('Id', 'Name', 'Status', 'Arn', 'Email')} for a in listing]}
                    if request['action'] == 'ListAccounts' else
                    {'Organization': {'Id': 'o-example', 'MasterAccountId': '123456789012'}}))
            if (request['action'] == 'AssumeRole'
                    and dict(urllib.parse.parse_qsl(request['body'].decode()))['RoleArn'] in refused):
                return ('status', 403, ACCESS_DENIED.format(caller='the caller', role='the role'))
        return judge(request)
    org['proxy'].rule = rule
    account = org_account(org, assume_role_arn=admin_role['Arn'],
                          exclude_accounts=[members['without-role']['id']])
    for run in (1, 2):
        caplog.clear()
        with pytest.raises(core.RunFailed) as failed:
            core.Runner(ec2.DataCollector(account, {'regions': REGIONS}), force=True).run()
        # The caller's own account is a member like any other: its refusal is a failure ...
        assert f'1 account(s) failed: {delegated}' in str(failed.value)
        lines = [r.getMessage() for r in caplog.records]
        assert [line for line in lines if 'FAILED' in line and delegated in line]
        # ... and the management account without the role one line, not a failure.
        assert [line for line in lines if '123456789012' in line and 'skipped: the management account' in line]
        assert not [line for line in lines if '123456789012' in line and 'FAILED' in line]
        written = set(by_account(sink))
        assert members['external-id']['id'] in written and not written & {delegated, '123456789012'}
    # Asked once, then kept.
    assert asked.count('DescribeOrganization') == 1


# --------------------------------------------------------------------------
# Accounts started a ListAccounts page at a time (reviewed)
# --------------------------------------------------------------------------

@pytest.fixture
def one_per_page(monkeypatch):
    """ListAccounts a page per account, as an Organization of many pages."""
    import botocore.paginate
    paginate = botocore.paginate.Paginator.paginate

    def small(self, **kwargs):
        if self._model.name == 'ListAccounts':
            kwargs['PaginationConfig'] = {'PageSize': 1}
        return paginate(self, **kwargs)
    monkeypatch.setattr(botocore.paginate.Paginator, 'paginate', small)



def test_a_listing_denied_midway_fails_at_once_while_roles_hang(aws, org, sink, caplog, one_per_page):
    """Page 2 of ListAccounts is refused while page 1's member role hangs: one
    line, at once, and no thread left."""
    import time
    caplog.set_level('INFO', logger='integration')
    base = org['proxy'].rule

    def rule(request):
        if request['service'] == 'organizations' and b'NextToken' in (request['body'] or b''):
            return ('status', 400, '{"__type":"AccessDeniedException","Message":"page two denied"}')
        if request['action'] == 'AssumeRole':
            return ('delay', 30)
        return base(request)
    org['proxy'].rule = rule
    started = time.monotonic()
    with pytest.raises(core.RunFailed, match='organizations:ListAccounts'):
        core.Runner(ec2.DataCollector(org_account(org), {'regions': REGIONS}), force=True).run()
    assert time.monotonic() - started < 1.5
    assert len(failure_lines(caplog)) == 1
    assert our_threads_left(core.STOP_GRACE + 1) == []
    assert sink.points == []


def test_hook_lines_come_after_the_account_lines(aws, org, sink, caplog, one_per_page):
    """Pages that arrive while the accounts are listed become points at once;
    the user's hooks still run in collect(): their lines follow the accounts'."""
    caplog.set_level('INFO', logger='integration')
    account = org_account(org, exclude_accounts=[org['members']['without-role']['id']])

    def after_collect(point):
        raise ValueError('boom')
    for _ in range(3):
        caplog.clear()
        with pytest.raises(core.RunFailed):
            core.Runner(ec2.DataCollector(account, {'regions': REGIONS}, after_collect=after_collect),
                        force=True).run()
        kinds = ['hook' if 'raised ValueError' in line else 'account' for line in
                 (r.getMessage() for r in caplog.records)
                 if 'raised ValueError' in line or ' as arn:' in line]
        assert 'hook' in kinds and kinds == sorted(kinds), kinds


def test_after_a_retry_every_account_collected_is_fresh(aws, org, sink):
    """A member's kept session refused everywhere is retried within the run;
    then the skip rule holds for every account collected, not only the retried."""
    from servers import ec2_error
    members = org['members']
    wanted = members['with-instances']
    account = org_account(org, exclude_accounts=[members['without-role']['id']])
    now = [1_800_000_000.0]

    def run():
        return core.Runner(ec2.DataCollector(account, {'regions': REGIONS}), clock=lambda: now[0]).run()
    run()
    keys = {k for k, arn in org['proxy'].issued.items() if f":{wanted['id']}:" in arn}
    base = org['proxy'].rule
    org['proxy'].rule = lambda r: (('status', 401, ec2_error('AuthFailure', 'revoked'))
                                   if r['service'] == 'ec2' and r['access_key'] in keys else base(r))
    now[0] += 1000
    run()
    collected = {p['tags']['AccountId'] for _, p in sink.points}
    assert wanted['id'] in collected and len(collected) >= 2
    now[0] += 300
    sink.points.clear()
    run()
    assert sink.points == [], 'accounts collected 300 s ago were collected again'


# --------------------------------------------------------------------------
# One bound of requests in flight; a throttled account leaves the others room
# (from an adversarial review)
# --------------------------------------------------------------------------

def slowed(proxy, actions, seconds):
    """Each call of `actions` held `seconds` at the proxy; returns the list of
    (start, end, action, access key) of each, filled as they end."""
    spans, lock = [], threading.Lock()
    forward = proxy._forward

    def held(method, path, headers, body):
        params = dict(urllib.parse.parse_qsl(body.decode('utf-8', 'replace'))) if body else {}
        if params.get('Action') not in actions:
            return forward(method, path, headers, body)
        key = re.search(r'Credential=([A-Z0-9]+)/', headers.get('Authorization', ''))
        start = time.monotonic()
        time.sleep(seconds)
        try:
            return forward(method, path, headers, body)
        finally:
            with lock:
                spans.append((start, time.monotonic(), params['Action'], key and key.group(1)))
    proxy._forward = held
    return spans


def most_at_once(spans):
    events = sorted([(start, 1) for start, _, _, _ in spans] + [(end, -1) for _, end, _, _ in spans])
    now = most = 0
    for _, step in events:
        now += step
        most = max(most, now)
    return most


@pytest.mark.parametrize('concurrency', [1, 3])
def test_requests_in_flight_stay_within_concurrency_member_roles_included(
        aws, org, sink, no_kept_sessions, concurrency):
    spans = slowed(org['proxy'], ('AssumeRole', 'DescribeInstances'), 0.2)
    account = org_account(org, exclude_accounts=[org['members']['without-role']['id']])
    core.Runner(ec2.DataCollector(account, {'regions': REGIONS, 'concurrency': concurrency}),
                force=True).run()
    assert {action for _, _, action, _ in spans} == {'AssumeRole', 'DescribeInstances'}
    assert most_at_once(spans) <= concurrency, sorted(spans)


def test_a_throttled_account_leaves_the_other_accounts_room(aws, org, sink, monkeypatch):
    from servers import ec2_error
    members = org['members']
    account = org_account(org, exclude_accounts=[members['without-role']['id']])
    core.Runner(ec2.DataCollector(account, {'regions': REGIONS}), force=True).run()   # sessions made
    proxy = org['proxy']
    hot = {key for key, arn in proxy.issued.items() if f":{members['with-instances']['id']}:" in arn}
    throttled = collections.Counter()
    judge = proxy.rule

    def rule(request):
        if request['action'] == 'DescribeInstances' and request['access_key'] in hot:
            throttled[request['region']] += 1
            if throttled[request['region']] <= 2:
                return ('status', 503, ec2_error('RequestLimitExceeded', 'Request limit exceeded.'))
        return judge(request)
    proxy.rule = rule
    # Each region's collection, as the pool's threads run it (botocore's
    # backoff between retries included).
    spans, fetch = [], ec2.DataCollector._fetch_region

    def timed(self, client, result, run):
        start = time.monotonic()
        try:
            return fetch(self, client, result, run)
        finally:
            spans.append((start, time.monotonic(), result['account'], None))
    monkeypatch.setattr(ec2.DataCollector, '_fetch_region', timed)
    core.Runner(ec2.DataCollector(account, {'regions': REGIONS, 'concurrency': 2}), force=True).run()
    assert min(throttled.values()) == 3         # each region throttled twice, then answered
    assert set(by_account(sink)) >= {members['with-instances']['id'], members['external-id']['id']}
    # At most half the pool (one thread of two) for any account: the other
    # thread goes on with the other accounts while the throttled one backs off.
    for member in {a for _, _, a, _ in spans}:
        assert most_at_once([span for span in spans if span[2] == member]) == 1, (member, spans)
    assert most_at_once(spans) == 2


def test_cloudwatch_gives_an_account_at_most_half_the_pool(aws, org, sink, monkeypatch):
    """Each CloudWatch call held 0.3 s: with concurrency 2, an account's
    discoveries and reads run one at a time, the other thread serving the
    other accounts (a throttled account, whose retries botocore sleeps on
    the pool's threads, cannot hold them all)."""
    proxy = org['proxy']
    judge = proxy.rule
    proxy.rule = lambda request: ('delay', 0.3) if request['service'] == 'monitoring' else judge(request)
    spans = []

    def timed(method):
        def run(self, *args):
            start = time.monotonic()
            try:
                return method(self, *args)
            finally:
                spans.append((start, time.monotonic(), self.member.account_id, None))
        return run
    monkeypatch.setattr(cw._Region, 'discover', timed(cw._Region.discover))
    monkeypatch.setattr(cw._Region, '_read', timed(cw._Region._read))
    account = org_account(org, exclude_accounts=[org['members']['without-role']['id']])
    core.Runner(cw.DataCollector(account, {'regions': REGIONS, 'concurrency': 2}), force=True).run()
    accounts = {a for _, _, a, _ in spans}
    assert len(accounts) >= 3
    for member in accounts:
        assert most_at_once([span for span in spans if span[2] == member]) == 1, (member, spans)
    assert most_at_once(spans) == 2


def test_an_account_failing_in_every_region_is_one_line(aws, org, sink, caplog):
    from servers import ec2_error
    caplog.set_level('INFO', logger='integration')
    members = org['members']
    account = org_account(org, exclude_accounts=[members['without-role']['id']])
    core.Runner(ec2.DataCollector(account, {'regions': REGIONS}), force=True).run()   # sessions made
    proxy = org['proxy']
    # Every session of the account is denied (a new one too: its role lost
    # the permission), and one region of another account.
    ext = members['external-id']

    def of(request, account_id):
        return f':{account_id}:' in proxy.issued.get(request['access_key'], '')
    judge = proxy.rule
    proxy.rule = lambda request: (
        ('status', 403, ec2_error('UnauthorizedOperation', 'You are not authorized to perform this operation.'))
        if request['action'] == 'DescribeInstances' and (
            of(request, members['with-instances']['id'])
            or of(request, ext['id']) and request['region'] == 'us-west-2')
        else judge(request))
    caplog.clear()
    sink.points.clear()
    with pytest.raises(core.RunFailed) as failed:
        core.Runner(ec2.DataCollector(account, {'regions': REGIONS}), force=True).run()
    broken = members['with-instances']
    why = ('ec2:DescribeInstances: UnauthorizedOperation: You are not authorized to perform this operation. '
           "(allow ec2:DescribeInstances in this region (see the README's policy))")
    assert failure_lines(caplog) == [
        f"[#1 AWS EC2] account {broken['id']} ({broken['name']}) FAILED in every region (2): {why}",
        f"[#1 AWS EC2] {ext['id']} us-west-2 FAILED: {why}"]
    assert str(failed.value).endswith(f"1 account(s) failed: {broken['id']}; "
                                      f"1 region(s) failed: {ext['id']} us-west-2")
    assert ext['id'] in by_account(sink)
    # The failures come after every region read: Func keeps a long log's
    # first and last characters only, and hundreds of region lines come
    # between an Organization's account lines and its end.
    lines = [r.getMessage() for r in caplog.records]
    read = [i for i, line in enumerate(lines) if re.search(r'\d{12} us-[a-z]+-\d: \d+ instance', line)]
    assert read and max(read) < min(lines.index(line) for line in failure_lines(caplog))


def _strip_account_state(monkeypatch):
    """Func's botocore (1.37): an organizations model without Account.State,
    whose parser drops it from the answer."""
    import copy
    import botocore.loaders
    load = botocore.loaders.Loader.load_service_model

    def without_state(self, service_name, type_name, api_version=None):
        model = load(self, service_name, type_name, api_version)
        if service_name == 'organizations' and type_name == 'service-2':
            model = copy.deepcopy(model)
            model['shapes']['Account']['members'].pop('State', None)
        return model
    monkeypatch.setattr(botocore.loaders.Loader, 'load_service_model', without_state)


@pytest.mark.parametrize('answer', ['state only', 'state and status', 'state only, model without it'])
def test_an_account_not_active_by_its_state_is_one_line_and_no_call(aws, org, sink, caplog, monkeypatch,
                                                                     answer):
    """AWS retired an account's Status on 2026-09-09 for State; State decides,
    Status or not beside it, and also where botocore's model does not know it."""
    caplog.set_level('INFO', logger='integration')
    members = org['members']
    not_active = {'999988887771': 'SUSPENDED', '999988887772': 'CLOSED',
                  '999988887773': 'PENDING_CLOSURE', '999988887774': 'PENDING_ACTIVATION'}
    listed = [('123456789012', 'management')] + [(m['id'], m['name']) for m in members.values()] + [
        (account_id, f'acct-{state.lower()}') for account_id, state in not_active.items()]

    def account(account_id, name):
        entry = {'Id': account_id, 'Name': name, 'Email': f'{account_id}@example.com',
                 'Arn': f'arn:aws:organizations::123456789012:account/o-example/{account_id}',
                 'State': not_active.get(account_id, 'ACTIVE')}
        if answer == 'state and status':     # Status still ACTIVE while State is being activated
            entry['Status'] = {'PENDING_ACTIVATION': 'ACTIVE'}.get(entry['State'], entry['State'])
        return entry
    judge = org['proxy'].rule
    org['proxy'].rule = lambda request: (
        ('status', 200, json.dumps({'Accounts': [account(*a) for a in listed]}))
        if request['action'] == 'ListAccounts' else judge(request))
    if answer == 'state only, model without it':
        _strip_account_state(monkeypatch)
    collector = ec2.DataCollector(org_account(org, exclude_accounts=[members['without-role']['id']]),
                                  {'regions': REGIONS})
    with aws.recording() as calls:
        core.Runner(collector, force=True).run()
    lines = [r.getMessage() for r in caplog.records]
    for account_id, state in not_active.items():
        assert [line for line in lines if account_id in line] == [
            f'[#1 AWS EC2] account {account_id} (acct-{state.lower()}) skipped: the account is {state}']
    # (The proxy's own view: an AssumeRole it refuses never reaches moto's recorder.)
    assumed = [r['body'].decode() for r in org['proxy'].seen if r['action'] == 'AssumeRole']
    assert assumed and not [body for body in assumed if any(a in body for a in not_active)]
    # (The management account has instances of other tests, or none.)
    assert set(by_account(sink)) - {'123456789012'} == {members['with-instances']['id'],
                                                        members['external-id']['id']}
    described = {org['proxy'].issued.get(c['access_key'], 'not a member session').split(':')[4]
                 for c in calls if c['action'] == 'DescribeInstances'}
    assert described == {'123456789012', members['with-instances']['id'], members['external-id']['id']}


REGIONS_XML = ('<DescribeRegionsResponse xmlns="http://ec2.amazonaws.com/doc/2016-11-15/"><requestId>r</requestId>'
               '<regionInfo>{}</regionInfo></DescribeRegionsResponse>')


def test_every_region_of_an_organization_is_each_members_own(aws, org, sink):
    """regions ['*']: opt-in regions differ by account, so each member's are
    its own DescribeRegions (kept for the hour: none in the next run), never
    the management account's."""
    members = org['members']
    few = members['external-id']
    proxy = org['proxy']
    judge = proxy.rule
    keys = {}

    def rule(request):
        who = proxy.issued.get(request['access_key'], '').split(':')[4:5]
        if request['action'] == 'DescribeRegions':
            keys.setdefault(who[0] if who else 'management', []).append(request['access_key'])
            if who == [few['id']]:
                return ('status', 200, REGIONS_XML.format(''.join(
                    f'<item><regionName>{r}</regionName><regionEndpoint>ec2.{r}.amazonaws.com</regionEndpoint>'
                    '<optInStatus>opt-in-not-required</optInStatus></item>' for r in REGIONS)))
        return judge(request)
    proxy.rule = rule
    account = org_account(org, member_accounts=[members['with-instances']['id'], few['id']])
    with aws.recording() as calls:
        core.Runner(ec2.DataCollector(account, {'regions': ['*']}), force=True).run()
    assert sorted(keys) == sorted([members['with-instances']['id'], few['id']])
    described = {}
    for call in calls:
        if call['action'] == 'DescribeInstances':
            described.setdefault(call['access_key'], set()).add(call['region'])
    regions_of = {proxy.issued[key].split(':')[4]: regions for key, regions in described.items()}
    assert regions_of[few['id']] == set(REGIONS)
    assert len(regions_of[members['with-instances']['id']]) > len(REGIONS)
    points = by_account(sink)
    assert len(points[members['with-instances']['id']]) == 3 and len(points[few['id']]) == 1
    keys.clear()
    core.Runner(ec2.DataCollector(account, {'regions': ['*']}), force=True).run()
    assert keys == {}


@pytest.mark.parametrize('collector', [ec2.DataCollector, cw.DataCollector])
def test_a_member_whose_regions_cannot_be_looked_up_is_one_line(aws, org, sink, caplog, collector):
    from servers import ec2_error
    caplog.set_level('INFO', logger='integration')
    members = org['members']
    few = members['external-id']
    proxy = org['proxy']
    judge = proxy.rule
    proxy.rule = lambda request: (
        ('status', 403, ec2_error('UnauthorizedOperation', 'You are not authorized to perform this operation.'))
        if request['action'] == 'DescribeRegions' and f":{few['id']}:" in proxy.issued.get(request['access_key'], '')
        else judge(request))
    account = org_account(org, member_accounts=[members['with-instances']['id'], few['id']])
    with aws.recording() as calls:
        with pytest.raises(core.RunFailed) as failed:
            core.Runner(collector(account, {'regions': ['*']}), force=True).run()
    assert str(failed.value).endswith(f"1 account(s) failed: {few['id']}")
    lines = failure_lines(caplog)
    assert len(lines) == 1 and f"account {few['id']} FAILED: regions ['*']: " \
        'ec2:DescribeRegions: UnauthorizedOperation' in lines[0], lines
    service = 'ec2' if collector is ec2.DataCollector else 'monitoring'
    used = {proxy.issued.get(c['access_key'], '').split(':')[4] for c in calls
            if c['service'] == service and c['action'] != 'DescribeRegions'}
    assert used == {members['with-instances']['id']}


def test_the_management_account_whose_regions_cannot_be_looked_up_fails(aws, org, sink, caplog):
    """Skipped as "the management account" is only a refused role; its role
    assumed, a failure after it (its regions' lookup) is a failure."""
    from servers import ec2_error
    caplog.set_level('INFO', logger='integration')
    proxy = org['proxy']
    judge = proxy.rule
    proxy.rule = lambda request: (
        ('status', 403, ec2_error('UnauthorizedOperation', 'You are not authorized to perform this operation.'))
        if request['action'] == 'DescribeRegions' and ':123456789012:' in proxy.issued.get(request['access_key'], '')
        else judge(request))
    aws.enforce(False)
    try:        # every account but these two (other tests may have added some)
        others = [a['Id'] for a in aws.client('organizations', 'us-east-1').list_accounts()['Accounts']
                  if a['Id'] not in ('123456789012', org['members']['external-id']['id'])]
    finally:
        aws.enforce()
    with pytest.raises(core.RunFailed) as failed:
        core.Runner(ec2.DataCollector(org_account(org, exclude_accounts=others), {'regions': ['*']}),
                    force=True).run()
    assert str(failed.value).endswith('1 account(s) failed: 123456789012')
    assert not [r for r in caplog.records if 'skipped: the management account' in r.getMessage()]


def test_metrics_keep_the_skipped_accounts_tags_after_the_selection_is_edited(aws, org, sink):
    """The instance map is keyed as the skip rule is: excluding one more
    account 2 minutes later (the others skipped as fresh) must not leave the
    metrics without their instances' tags."""
    import datetime
    wanted = org['members']['with-instances']
    instance = wanted['instances']['us-east-1'][0]
    now = [float(int(time.time()) // 300 * 300 + 17)]
    aws.enforce(False)
    try:
        aws.client('cloudwatch', 'us-east-1', member_creds(aws, wanted['id'])).put_metric_data(
            Namespace='AWS/EC2', MetricData=[{
                'MetricName': 'CPUUtilization', 'Dimensions': [{'Name': 'InstanceId', 'Value': instance}],
                'Timestamp': datetime.datetime.fromtimestamp(now[0] - 600 - 250 + 300 * k, datetime.timezone.utc),
                'Value': 42.0} for k in range(3)])
    finally:
        aws.enforce()

    def run(**selection):
        account = org_account(org, **selection)
        sink.points.clear()
        core.Runner([ec2.DataCollector(account, {'regions': REGIONS}),
                     cw.DataCollector(account, {'regions': REGIONS}, now=lambda: now[0])],
                    clock=lambda: now[0]).run()
        return [p for p in sink.metrics() if p['tags']['InstanceId'] == instance]
    first = run(member_accounts=[wanted['id'], org['members']['external-id']['id']])
    assert first and first[0]['tags']['InstanceType']
    now[0] += 300
    later = run(member_accounts=[wanted['id']])
    assert later and all(p['tags'].get('InstanceType') == first[0]['tags']['InstanceType'] for p in later)
    # Another startup script of the Organization (the accounts split between
    # scripts, as the README advises) shares the map: it keeps this one's.
    run(member_accounts=[org['members']['external-id']['id']])
    now[0] += 300
    later = run(member_accounts=[wanted['id']])
    assert later and all(p['tags'].get('InstanceType') == first[0]['tags']['InstanceType'] for p in later)


def test_a_members_regions_lookup_ends_with_the_run(aws, org, sink):
    """regions ['*']: a member's DescribeRegions that hangs is cut off when
    the task's timeout ends the run, like every other call."""
    import integration_local.cli as local_cli
    proxy = org['proxy']
    judge = proxy.rule
    member = org['members']['external-id']['id']
    proxy.rule = lambda request: (('delay', 20) if request['action'] == 'DescribeRegions'
                                  and f':{member}:' in proxy.issued.get(request['access_key'], '')
                                  else judge(request))
    account = org_account(org, member_accounts=[member])
    api = {'title': 'org', 'name': 'run', 'timeout': 2,
           'func': lambda: core.Runner(ec2.DataCollector(account, {'regions': ['*']}), force=True).run()}
    started = time.monotonic()
    assert local_cli.run_api(api) == local_cli.EXIT_FAILED
    assert time.monotonic() - started < 5
    assert our_threads_left(3) == []


def test_the_members_regions_lookups_count_in_concurrency(aws, org, sink, no_kept_sessions):
    proxy = org['proxy']
    few = ''.join(f'<item><regionName>{r}</regionName><regionEndpoint>ec2.{r}.amazonaws.com</regionEndpoint>'
                  '<optInStatus>opt-in-not-required</optInStatus></item>' for r in REGIONS)
    spans = slowed(proxy, ('AssumeRole', 'DescribeInstances'), 0.2)
    held = proxy._forward

    def answer(method, path, headers, body):
        if b'Action=DescribeRegions' not in body:
            return held(method, path, headers, body)
        start = time.monotonic()        # each member's two regions, after 0.2 s
        time.sleep(0.2)
        spans.append((start, time.monotonic(), 'DescribeRegions', None))
        return 200, {'Content-Type': 'text/xml'}, REGIONS_XML.format(few).encode()
    proxy._forward = answer
    members = org['members']
    account = org_account(org, member_accounts=[members['with-instances']['id'], members['external-id']['id']])
    core.Runner(ec2.DataCollector(account, {'regions': ['*'], 'concurrency': 1}), force=True).run()
    assert [action for _, _, action, _ in spans].count('DescribeRegions') == 2
    assert most_at_once(spans) == 1, sorted(spans)


@pytest.mark.parametrize('collector', [ec2.DataCollector, cw.DataCollector])
def test_check_of_every_region_has_each_members_own(aws, org, collector):
    proxy = org['proxy']
    judge = proxy.rule
    few = ''.join(f'<item><regionName>{r}</regionName><regionEndpoint>ec2.{r}.amazonaws.com</regionEndpoint>'
                  '<optInStatus>opt-in-not-required</optInStatus></item>' for r in REGIONS)
    proxy.rule = lambda request: (('status', 200, REGIONS_XML.format(few))
                                  if request['action'] == 'DescribeRegions' else judge(request))
    wanted = org['members']['with-instances']['id']
    rows = collector(org_account(org, member_accounts=[wanted]), {'regions': ['*']}).check()
    assert [(row['region'], row['ok']) for row in rows] == [(f'{wanted} {r}', True) for r in REGIONS], rows


def test_steady_state_makes_no_sts_call_for_hours(aws, org, sink):
    """A run every 15 minutes for two hours (member sessions of 12 hours):
    after the first run, not one STS call; the member sessions are not shown
    to AWS every hour (a revoked one is dropped when used: next test), and
    the management keys' identity is kept for a day."""
    now = [datetime.datetime.now(datetime.timezone.utc)]
    account = org_account(org, exclude_accounts=[org['members']['without-role']['id']])
    sts = []
    for _ in range(9):
        with aws.recording() as calls:
            core.Runner(ec2.DataCollector(account, {'regions': REGIONS}, clock=lambda: now[0]),
                        force=True).run()
        sts.append(sorted(c['action'] for c in calls if c['service'] == 'sts'))
        now[0] += datetime.timedelta(minutes=15)
    assert 'AssumeRole' in sts[0] and sts[1:] == [[]] * 8, sts


def test_a_member_session_aws_revoked_is_replaced_in_the_same_run(aws, org, sink, caplog):
    """A kept member session that AWS refuses (revoked): its regions are
    refused, the session is dropped and the account collected again with a
    new one, in the same run, which ends well."""
    from servers import ec2_error
    caplog.set_level('INFO', logger='integration')
    members = org['members']
    target = members['with-instances']['id']
    account = org_account(org, member_accounts=[target, members['external-id']['id']])
    core.Runner(ec2.DataCollector(account, {'regions': REGIONS}), force=True).run()
    revoked = {key for key, arn in org['proxy'].issued.items() if arn.split(':')[4] == target}
    judge = org['proxy'].rule

    def rule(request):
        if request['access_key'] in revoked and request['service'] == 'ec2':
            return ('status', 401, ec2_error('AuthFailure', 'AWS was not able to validate the '
                                             'provided access credentials'))
        return judge(request)
    org['proxy'].rule = rule
    sink.points.clear()
    with aws.recording() as calls:
        core.Runner(ec2.DataCollector(account, {'regions': REGIONS}), force=True).run()
    assume = [c for c in calls if c['action'] == 'AssumeRole']
    assert len(assume) == 1, 'one new session, for the revoked account only'
    names = sorted(p['tags']['name'] for _, p in sink.points if p['tags'].get('AccountId') == target)
    wanted = members['with-instances']['instances']
    assert names == sorted(wanted['us-east-1'] + wanted['us-west-2'])
    assert not [r for r in caplog.records if 'FAILED' in r.getMessage()]


@pytest.mark.parametrize('collector', [ec2.DataCollector, cw.DataCollector])
def test_a_member_session_denied_everywhere_after_it_worked_is_replaced_once(aws, org, sink, caplog,
                                                                           collector):
    """IAM's "Revoke active sessions" denies every call of the sessions
    issued before it (UnauthorizedOperation, AccessDenied): a kept session
    that worked and is now denied in every region is replaced in the same
    run. A role that is denied with a new session too costs no AssumeRole in
    the runs after (its session never worked), nor does a region denied
    alone (a service control policy's region deny)."""
    from servers import cloudwatch_error, ec2_error
    caplog.set_level('DEBUG', logger='integration')
    members = org['members']
    target = members['with-instances']['id']
    account = org_account(org, member_accounts=[target, members['external-id']['id']])
    proxy = org['proxy']
    judge = proxy.rule
    denied, denied_regions = set(), set(REGIONS)

    def rule(request):
        if (proxy.issued.get(request['access_key'], '').split(':')[4:5] == [target]
                and request['region'] in denied_regions
                and (request['access_key'] in denied or 'all' in denied)):
            if request['service'] == 'ec2' and request['action'] == 'DescribeInstances':
                return ('status', 403, ec2_error('UnauthorizedOperation', 'You are not authorized to '
                                                 'perform this operation. ... with an explicit deny'))
            if request['service'] == 'monitoring':
                return ('status', 400, cloudwatch_error(
                    'AccessDenied', f'User: arn:aws:sts::{target}:assumed-role/r/Integration is not '
                    'authorized to perform: cloudwatch:GetMetricData with an explicit deny'))
        return judge(request)
    proxy.rule = rule

    clock = [time.time()]
    extra = {}
    if collector is cw.DataCollector:
        # A series in each region, and a new bucket each run: every region calls.
        import datetime
        extra['now'] = lambda: clock[0]
        aws.enforce(False)
        try:
            for region in REGIONS:
                aws.client('cloudwatch', region, member_creds(aws, target)).put_metric_data(
                    Namespace='AWS/EC2', MetricData=[{
                        'MetricName': 'CPUUtilization', 'Value': 1.0,
                        'Dimensions': [{'Name': 'InstanceId',
                                        'Value': members['with-instances']['instances'][region][0]}],
                        'Timestamp': datetime.datetime.fromtimestamp(clock[0] - 900, datetime.timezone.utc)}])
        finally:
            aws.enforce()

    def run():
        caplog.clear()
        sink.points.clear()
        clock[0] += 300
        failed = None
        with aws.recording() as calls:
            try:
                core.Runner(collector(account, {'regions': REGIONS}, **extra), force=True).run()
            except core.RunFailed as e:
                failed = str(e)
        return failed, len([c for c in calls if c['action'] == 'AssumeRole']), failure_lines(caplog)
    assert run()[0] is None
    # Revoked: the sessions issued so far are denied, new ones are not.
    denied.update(key for key, arn in proxy.issued.items() if arn.split(':')[4] == target)
    failed, assumed, lines = run()
    assert (failed, assumed) == (None, 1)
    code = 'UnauthorizedOperation' if collector is ec2.DataCollector else 'AccessDenied'
    assert lines == []
    assert f'[{collector.title}] AWS denied the kept session of account {target} in every region ({code}), ' \
        'where it worked before (revoked?): dropped; collecting once more with a new one' in caplog.text
    if collector is ec2.DataCollector:
        assert target in by_account(sink)
    # Denied to any session: replaced once (it worked last run), then never.
    denied.add('all')
    failed, assumed, lines = run()
    assert assumed == 1 and failed.endswith(f'1 account(s) failed: {target}')
    assert len([line for line in lines if target in line]) == 1, 'a failing account is one line'
    failed, assumed, lines = run()
    assert assumed == 0 and failed.endswith(f'1 account(s) failed: {target}')
    # The role deleted after it worked: its old session denied, a new one
    # refused. The account is its one line still, and the run fails.
    denied.discard('all')
    run()       # a new session, which works
    denied.add('all')
    role_gone = proxy.rule
    proxy.rule = lambda request: ('status', 403, ACCESS_DENIED.format(caller=org['user']['arn'], role=target)) \
        if request['action'] == 'AssumeRole' and target in request['body'].decode() else role_gone(request)
    failed, assumed, lines = run()
    proxy.rule = role_gone
    assert failed is not None and failed.endswith(f'1 account(s) failed: {target}'), failed
    assert [line for line in lines if target in line] == [
        line for line in lines if f'account {target} FAILED: sts:AssumeRole: AccessDenied' in line]
    assert len(lines) == 1
    # One region denied to a session that works: no new session.
    denied.discard('all')
    run()       # a new session, which works
    denied.add('all')
    denied_regions.discard(REGIONS[0])
    failed, assumed, lines = run()
    assert assumed == 0 and failed.endswith(f'1 region(s) failed: {target} {REGIONS[1]}')


STS_REFUSED = ('<ErrorResponse><Error><Type>Sender</Type><Code>InvalidClientTokenId</Code>'
               '<Message>The security token included in the request is invalid.</Message></Error>'
               '<RequestId>t</RequestId></ErrorResponse>')


@pytest.mark.parametrize('answer', ['refused', 'denied'])
def test_a_revoked_member_session_is_replaced_with_regions_star(aws, org, sink, caplog, answer):
    """regions ['*']: once the member's kept regions are an hour old, its
    DescribeRegions is the first call a revoked session makes; refused (or
    denied, after it worked), the session is dropped and the account opened
    again, in the same run."""
    from servers import ec2_error
    caplog.set_level('DEBUG', logger='integration')
    now = [datetime.datetime.now(datetime.timezone.utc)]
    cache = core.MemoryCache(clock=lambda: now[0].timestamp())
    target = org['members']['with-instances']
    account = org_account(org, member_accounts=[target['id']])

    def run():
        sink.points.clear()
        core.Runner(ec2.DataCollector(account, {'regions': ['*']}, clock=lambda: now[0], cache=cache),
                    force=True).run()
        return sorted(p['tags']['name'] for _, p in sink.points)
    run()
    proxy, judge = org['proxy'], org['proxy'].rule
    revoked = {key for key, arn in proxy.issued.items() if arn.split(':')[4] == target['id']}
    code = 'AuthFailure' if answer == 'refused' else 'UnauthorizedOperation'
    proxy.rule = lambda r: (('status', 401 if answer == 'refused' else 403, ec2_error(code, 'not this session'))
                            if r['access_key'] in revoked else judge(r))
    now[0] += datetime.timedelta(minutes=61)
    with aws.recording() as calls:
        names = run()
    assert names == sorted(target['instances']['us-east-1'] + target['instances']['us-west-2'])
    assert len([c for c in calls if c['action'] == 'AssumeRole']) == 1
    assert any(f"AWS {answer} the kept session of account {target['id']} ({code}): dropped; opening "
               'a new one' in r.getMessage() for r in caplog.records)


def test_management_keys_revoked_while_their_identity_is_kept_are_one_line(aws, org, sink, caplog):
    """The keys' identity is kept for a day; keys revoked meanwhile (member
    sessions expired) are one line, not one per member account, and their
    identity is asked again next run."""
    caplog.set_level('INFO', logger='integration')
    now = [datetime.datetime.now(datetime.timezone.utc)]
    cache = core.MemoryCache(clock=lambda: now[0].timestamp())
    members, proxy = org['members'], org['proxy']
    account = org_account(org, member_accounts=[members['with-instances']['id'], members['external-id']['id']])

    def run():
        caplog.clear()
        with pytest.raises(core.RunFailed) as failed:
            core.Runner(ec2.DataCollector(account, {'regions': REGIONS}, clock=lambda: now[0], cache=cache),
                        force=True).run()
        return failed.value, [r.getMessage() for r in caplog.records if 'FAILED' in r.getMessage()]
    core.Runner(ec2.DataCollector(account, {'regions': REGIONS}, clock=lambda: now[0], cache=cache),
                force=True).run()
    judge = proxy.rule
    proxy.rule = lambda r: ('status', 403, STS_REFUSED) if r['access_key'] == org['user']['ak_id'] else judge(r)
    try:
        now[0] += datetime.timedelta(hours=13)      # the member sessions (12 h) are over
        error, failed = run()
        assert len(failed) == 1 and 'FAILED: account: AuthError: sts:AssumeRole: InvalidClientTokenId' in failed[0], failed
        seen = len(proxy.seen)
        error, failed = run()
        # (Asked again; the members' AssumeRole go out meanwhile, in any order.)
        assert 'GetCallerIdentity' in [r['action'] for r in proxy.seen[seen:] if r['service'] == 'sts']
        assert len(failed) == 1 and 'FAILED: account: AuthError: sts:GetCallerIdentity: InvalidClientTokenId' in failed[0]
    finally:
        proxy.rule = judge


def test_keys_refused_at_the_listing_are_asked_about_again_next_run(aws, org, sink, caplog):
    """The management keys' identity is kept for a day; keys revoked
    meanwhile fail ListAccounts (one line), and the next run asks their
    identity again, whose line says what to check."""
    caplog.set_level('INFO', logger='integration')
    cache = core.MemoryCache()
    proxy = org['proxy']
    account = org_account(org, exclude_accounts=[org['members']['without-role']['id']])

    def run():
        caplog.clear()
        seen = len(proxy.seen)
        with pytest.raises(core.RunFailed):
            core.Runner(ec2.DataCollector(account, {'regions': REGIONS}, cache=cache), force=True).run()
        return ([r['action'] for r in proxy.seen[seen:] if r['service'] in ('sts', 'organizations')],
                [r.getMessage() for r in caplog.records if 'FAILED' in r.getMessage()])
    core.Runner(ec2.DataCollector(account, {'regions': REGIONS}, cache=cache), force=True).run()
    judge = proxy.rule
    proxy.rule = lambda r: ('status', 400, json.dumps({'__type': 'UnrecognizedClientException',
                                                       'message': 'The security token included in the '
                                                                  'request is invalid.'}))\
        if r['access_key'] == org['user']['ak_id'] and r['service'] == 'organizations' else \
        ('status', 403, STS_REFUSED) if r['access_key'] == org['user']['ak_id'] else judge(r)
    try:
        calls, failed = run()
        assert calls[0] == 'ListAccounts' and len(failed) == 1 and 'UnrecognizedClientException' in failed[0]
        calls, failed = run()
        assert calls[0] == 'GetCallerIdentity', calls
        assert len(failed) == 1 and 'FAILED: account: AuthError: sts:GetCallerIdentity: InvalidClientTokenId' \
            in failed[0], failed
    finally:
        proxy.rule = judge
