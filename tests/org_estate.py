"""An AWS Organization in moto for the tests: a management account and three
members (one without the role, one with instances in two regions, one whose
role requires an ExternalId), and a proxy in front of moto doing what moto
leaves out: a role in another account must exist and trust the caller's
ExternalId. Used by tests/test_organizations.py and the Func tier."""
import json
import re
import urllib.parse

from conftest import unique
from integration_local.emulator import READ_POLICY, USER_POLICY
from servers import FaultProxy

ROLE = 'org-reader'
EXTERNAL_ID = 'member-ext-1234'
REGIONS = ['us-east-1', 'us-west-2']
ORG_POLICY = {'Version': '2012-10-17', 'Statement': USER_POLICY['Statement'] + [
    {'Effect': 'Allow', 'Action': ['organizations:ListAccounts'], 'Resource': '*'}]}
ACCESS_DENIED = ('<ErrorResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/"><Error><Type>Sender'
                 '</Type><Code>AccessDenied</Code><Message>User: {caller} is not authorized to perform: '
                 'sts:AssumeRole on resource: {role}</Message></Error><RequestId>t</RequestId></ErrorResponse>')


class CrossAccountRoles(FaultProxy):
    """moto in front of which AssumeRole into another account is judged as AWS
    does: the role must exist there and its trust policy's ExternalId match.
    It also notes which role each issued access key belongs to."""

    def __init__(self, upstream):
        self.roles = {}             # role ARN -> ExternalId it requires (None: none)
        self.issued = {}            # temporary access key id -> role ARN
        super().__init__(upstream, self.rule)

    def rule(self, request):
        if request['service'] != 'sts' or request['action'] != 'AssumeRole':
            return None
        params = dict(urllib.parse.parse_qsl(request['body'].decode()))
        arn = params['RoleArn']
        account = arn.split(':')[4]
        if account == '123456789012' and arn not in self.roles:
            return None             # the management account's own roles: moto checks them
        if arn not in self.roles or (self.roles[arn] and params.get('ExternalId') != self.roles[arn]):
            return ('status', 403, ACCESS_DENIED.format(caller='the caller', role=arn))
        return None

    def _forward(self, method, path, headers, body):
        status, response_headers, data = super()._forward(method, path, headers, body)
        text = data.decode('utf-8', 'replace')
        if 'AssumeRoleResponse' in text:
            params = dict(urllib.parse.parse_qsl(body.decode()))
            key = re.search(r'<AccessKeyId>([^<]+)</AccessKeyId>', text).group(1)
            self.issued[key] = params['RoleArn']
        return status, response_headers, data


def lay_out(emulator):
    """The Organization (moto allows one per management account: make it
    once per test session), with enforcement off while its accounts are laid
    out (moto's OrganizationAccountAccessRole has no policy), then on again."""
    emulator.enforce(False)
    try:
        return _lay_out(emulator)
    finally:
        emulator.enforce()


def _lay_out(emulator):
    admin = emulator.client('organizations', 'us-east-1')
    try:
        admin.create_organization(FeatureSet='ALL')
    except admin.exceptions.AlreadyInOrganizationException:
        pass
    user = emulator.make_user(unique('org-collector'), 'aws', policy=ORG_POLICY)
    members = {}
    for label in ('with-instances', 'without-role', 'external-id'):
        status = admin.create_account(Email=f'{label}@example.com',
                                      AccountName=unique(label))['CreateAccountStatus']
        members[label] = {'id': status['AccountId'], 'name': status['AccountName']}
    roles = {}
    for label, member in members.items():
        creds = member_creds(emulator, member['id'])
        if label != 'without-role':
            iam = emulator.client('iam', 'us-east-1', creds)
            condition = ({'Condition': {'StringEquals': {'sts:ExternalId': EXTERNAL_ID}}}
                         if label == 'external-id' else {})
            iam.create_role(RoleName=ROLE, AssumeRolePolicyDocument=json.dumps({
                'Version': '2012-10-17', 'Statement': [dict(
                    {'Effect': 'Allow', 'Principal': {'AWS': user['arn']}, 'Action': 'sts:AssumeRole'},
                    **condition)]}))
            iam.put_role_policy(RoleName=ROLE, PolicyName='p', PolicyDocument=json.dumps(READ_POLICY))
            roles[f"arn:aws:iam::{member['id']}:role/{ROLE}"] = EXTERNAL_ID if label == 'external-id' else None
        member['instances'] = {}
        for region, count in {'with-instances': {'us-east-1': 2, 'us-west-2': 1},
                              'external-id': {'us-east-1': 1}}.get(label, {}).items():
            ec2_client = emulator.client('ec2', region, creds)
            reply = ec2_client.run_instances(ImageId='ami-12c6146b', MinCount=count, MaxCount=count)
            member['instances'][region] = [i['InstanceId'] for i in reply['Instances']]
    # The role in the management account too: it is collected like a member.
    emulator.make_role(ROLE, user['arn'], 'aws')
    return {'user': user, 'members': members, 'roles': roles}


def member_creds(emulator, account_id):
    """The admin's way into a member account: OrganizationAccountAccessRole."""
    c = emulator.assume(f'arn:aws:iam::{account_id}:role/OrganizationAccountAccessRole',
                        emulator.admin('aws'), 'us-east-1')
    return {'ak_id': c['AccessKeyId'], 'ak_secret': c['SecretAccessKey'], 'token': c['SessionToken']}
