"""AWS sessions from the `account` dict of a DataFlux Func startup script.

Public entry points
    get_session(account, region=None, *, regions=None, cache=None, clock=None,
                operations=None, text_timestamps=False)
        -> boto3.session.Session whose credentials follow the account's method.
        operations={'ec2': ['DescribeInstances']}: its clients of those services
        know only those operations (much cheaper to make; see _LimitedLoader).
        text_timestamps: its EC2 clients give timestamps as iso_time's text, not
        datetimes (a collector that writes them as text; see FastParserFactory).
    iso_time(datetime) -> '2026-11-29T10:00:00Z': a time as collectors write it.
    describe_identity(session, account, region=None) -> dict without secrets:
        method, account_id, arn, partition (sts:GetCallerIdentity).
    validate_account(account, where='account') -> the checked account.
    auth_method(account) -> 'access_key' | 'assume_role' | 'mfa_session' |
        'mfa_assume_role' | 'default_chain' | 'default_chain_assume_role'.
    partition_of(region), check_partition(regions, where) -> partition name.
    sdk_setting_given(name) -> whether the user set botocore's `name` (e.g.
        'max_attempts', 'retry_mode') in the environment or the config file.
    take_client(session, service, region, config) -> a client of that session,
        the one the last run of the same credentials kept when there is one;
    keep_clients(clients): a run that ended well keeps them for the next
        (without their credentials); keep_member_sessions(sessions) likewise
        for member_session's.
    AccountConfigError (a ValueError, via core.ConfigError): every invalid account, before any AWS call.
    AuthError (a RuntimeError): credentials that AWS (or the machine) refused.

The account keys (the seed page is the contract)
    ak_id, ak_secret        the IAM user's long-term access key.
    assume_role_arn         sts:AssumeRole into this role (refreshed automatically).
    external_id             optional ExternalId for the role.
    role_session_name       optional, default "Integration".
    serial_number, token_code
                            MFA device and a 6-digit code. Without a role:
                            sts:GetSessionToken; with a role: AssumeRole with MFA.
                            The session is cached and reused; a code is sent once.
    duration_seconds        optional session length (role: 900..43200,
                            GetSessionToken: 900..129600). Default: 43200 for
                            GetSessionToken; for a role, the longest it allows
                            (43200 stepping down to 3600 on AWS's answer,
                            remembered per role; 3600 for role chaining).
    extra_tags              dict of str -> str added to every point.
    No ak_id: botocore's default chain (environment, profile, web identity,
    container, EC2 instance metadata), i.e. the instance's IAM role on EC2.

Caching
    Temporary credentials are kept between runs so that a */15 schedule makes one
    AssumeRole / GetSessionToken per session lifetime (and one GetCallerIdentity
    per run, which replaces a kept session AWS refuses): in DFF.CACHE inside
    Func, otherwise in files of mode 0600 under $INTEGRATION_STATE_DIR or
    ~/.cache/dataflux-integration, named by a hash. Stored: temporary
    credentials (sealed: encrypted and authenticated with keys derived from
    the base credentials' secret), the session's identity, keyed hashes of
    the MFA codes sent (per device) and each role's session length; never
    ak_secret. Sessions are filed under keys bound to the base credentials
    (ak_id and an HMAC of ak_secret, or the default chain's key and an HMAC of
    its secret). Entries of an unexpected shape, and sealed ones that do not
    open with the caller's secret, count as absent.

Environment honoured (through botocore; we never pass an explicit endpoint)
    AWS_ENDPOINT_URL, AWS_ENDPOINT_URL_STS, HTTPS_PROXY, AWS_CA_BUNDLE,
    AWS_EC2_METADATA_SERVICE_ENDPOINT, AWS_METADATA_SERVICE_TIMEOUT and the rest
    of botocore's settings.

IAM permissions
    sts:GetCallerIdentity (always allowed by AWS); sts:AssumeRole on the role for
    the role methods; sts:GetSessionToken for MFA without a role.
"""
import base64
import collections
import contextlib
import copy
import datetime
import difflib
import hashlib
import hmac
import json
import logging
import os
import re
import socket
import sys
import threading
import time
import types
import urllib.error
import urllib.request

import boto3
import botocore.parsers
import botocore.session
import botocore.utils
from botocore.config import Config
from botocore.credentials import RefreshableCredentials
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectTimeoutError,
    EndpointConnectionError,
)

import integration_core__runner as core

LOG = logging.getLogger('integration.aws.auth')

KNOWN_KEYS = (
    'ak_id', 'ak_secret', 'assume_role_arn', 'external_id', 'role_session_name',
    'serial_number', 'token_code', 'duration_seconds', 'extra_tags',
    'member_role_name', 'member_external_id', 'member_accounts', 'exclude_accounts',
)
# The collector_configs keys of this package's collectors, for the line that
# says where one put in the account dict belongs.
COLLECTOR_CONFIG_KEYS = ('regions', 'concurrency', 'retry_mode', 'max_attempts', 'page_size', 'targets',
                         'period', 'statistics', 'delay', 'discovery_interval', 'backfill')
# The keys that only select an Organization's accounts (see freshness_key).
ACCOUNT_LIST_KEYS = ('member_accounts', 'exclude_accounts')
SECRET_KEYS = ('ak_secret', 'token_code')
DEFAULT_ROLE_SESSION_NAME = 'Integration'

# AWS's documented limits (aws-facts.md, "STS limits"). ASCII only: AWS's
# \w and digits are ASCII, and a full-width digit typed by an input method
# must be one line here, not a refusal from AWS that blames the trust policy
# (or, in exclude_accounts, an account quietly not excluded).
ROLE_ARN_RE = re.compile(r'^arn:(aws[a-z-]*):iam::(\d{12}):role/((?:[\w+=,.@-]+/){0,32}[\w+=,.@-]{1,64})$',
                         re.ASCII)
SESSION_NAME_RE = re.compile(r'^[\w+=,.@-]{2,64}$', re.ASCII)
EXTERNAL_ID_RE = re.compile(r'^[\w+=,.@:/-]{2,1224}$', re.ASCII)
SERIAL_NUMBER_RE = re.compile(r'^[\w+=/:,.@-]{9,256}$', re.ASCII)
TOKEN_CODE_RE = re.compile(r'^\d{6}$', re.ASCII)
ACCOUNT_ID_RE = re.compile(r'^\d{12}$', re.ASCII)
REGION_RE = re.compile(r'^[a-z]{2}(-[a-z]+)+-\d{1,2}$', re.ASCII)
ROLE_NAME_RE = re.compile(r'^(?:[\w+=,.@-]+/)*[\w+=,.@-]{1,64}$', re.ASCII)
ACCESS_KEY_ID_RE = re.compile(r'^[A-Z0-9]{16,128}$')
ROLE_DURATION = (900, 43200)
SESSION_TOKEN_DURATION = (900, 129600)
SESSION_TOKEN_DEFAULT_DURATION = 43200

# The CLI treats a cached session with under 15 minutes left as expired; so do
# we, which is also botocore's advisory refresh window.
EXPIRY_MARGIN = datetime.timedelta(minutes=15)
MANDATORY_MARGIN = datetime.timedelta(minutes=10)
MFA_EXPIRY_MARGIN = datetime.timedelta(minutes=2)
MFA_WARN_LEFT = datetime.timedelta(hours=1)
# How long the record of a used MFA code is kept: long enough that a script
# left with a stale code keeps failing clearly instead of resending it.
USED_CODE_TTL = 30 * 24 * 3600
USED_CODES_KEPT = 8
# A role session without account['duration_seconds'] is as long as the role
# allows: these are tried from the longest down (AWS's own default is 1 h, and
# every role allows 1 h), and where it stopped is remembered per role for a
# week, so that a role whose limit is raised is probed again.
ROLE_DURATION_STEPS = (43200, 21600, 14400, 7200, 3600)
CHAINED_ROLE_DURATION = 3600    # AWS's cap when the base credentials are a session
ROLE_DURATION_TTL = 7 * 24 * 3600
# After AWS refused an MFA code on a shorter retry: 1 h for this role, no probing.
MFA_PINNED_DURATION_TTL = 365 * 24 * 3600
# GetCallerIdentity needs no permission: these answers mean that AWS refused
# the session itself.
REFUSED_SESSION_CODES = ('ExpiredToken', 'ExpiredTokenException', 'InvalidClientTokenId',
                         'InvalidToken', 'SignatureDoesNotMatch', 'AccessDenied', 'AuthFailure',
                         'UnrecognizedClientException')

# Cache entries (JSON text): what each holds is checked when read; an entry
# of another shape counts as absent. Sessions and used codes are filed under
# keys bound to the base credentials through an HMAC of their secret with a
# constant of this purpose (never the secret itself).
CACHE_KEY_HMAC = b'integration_aws_auth:cache-key-binding:v1'
# A session record is sealed (encrypted, then authenticated) with keys derived
# from the base credentials' secret, because DFF.CACHE is Func's shared Redis:
# every script reads every scope, and a failed task replays its Redis commands
# (values cut at 100 characters) on the worker's stdout. Only the standard
# library is available in Func, so the cipher is HMAC-SHA256 in counter mode
# (see _seal). Stored as SEALED_PREFIX + base64(nonce || ciphertext || tag).
SEAL_ENCRYPTION_INFO = b'integration_aws_auth cache encryption v1'
SEAL_MAC_INFO = b'integration_aws_auth cache mac v1'
SEALED_PREFIX = 'v1:'
SEAL_VERSION = b'\x01'
SEAL_NONCE_BYTES = 16
SEAL_TAG_BYTES = 16
SESSION_KEY_PREFIX = 'integration_aws_auth:session:'
CODES_KEY_PREFIX = 'integration_aws_auth:mfa-codes:'
DURATION_KEY_PREFIX = 'integration_aws_auth:role-duration:'
IDENTITY_KEY_PREFIX = 'integration_aws_auth:identity:'
# A collector's call answered so: the session itself is refused, not the action.
REFUSED_AT_USE_CODES = ('ExpiredToken', 'ExpiredTokenException', 'InvalidClientTokenId',
                        'InvalidToken', 'AuthFailure', 'UnrecognizedClientException',
                        'RequestExpired')
# A collector's call answered so: the action is denied. To a session that
# worked in an earlier run and is now denied everywhere, the likely reason
# is IAM's "Revoke active sessions" (a deny of the sessions issued before
# it): see CollectorAccount.forget_refused.
DENIED_CODES = ('UnauthorizedOperation', 'AccessDenied', 'AccessDeniedException')
# AWS's answers to too many requests (its services name it differently).
THROTTLING_CODES = ('Throttling', 'ThrottlingException', 'TooManyRequestsException',
                    'RequestLimitExceeded', 'RequestThrottled', 'SlowDown')
# STS answers that refuse the caller's keys before anything else is judged.
UNSIGNED_CODES = ('SignatureDoesNotMatch', 'InvalidClientTokenId', 'IncompleteSignature',
                  'UnrecognizedClientException')
# A cached session is shown to AWS at most this often (see _check_cached);
# an Organization's member sessions never are (see refreshable_credentials).
VERIFY_INTERVAL = 3600
VERIFIED_SUFFIX = ':verified'
# How long an Organization's management keys' identity is kept: the identity
# of an access key never changes, and keys revoked meanwhile are one line at
# their next organizations:ListAccounts or sts:AssumeRole.
MANAGEMENT_KEYS_IDENTITY_TTL = 86400
# An Organization's management account without the member role (the usual
# case: service-managed StackSets leave it out) is asked again at most this
# often; between, runs skip it with the line AWS gave, and ask STS nothing.
MANAGEMENT_ROLE_RECHECK = 3600
MANAGEMENT_ROLE_KEY_PREFIX = 'integration_aws_auth:management-role:'
# Which account is the Organization's management account (it never changes):
# asked of organizations:DescribeOrganization when a member role is refused,
# then kept this long.
MANAGEMENT_ID_TTL = 86400
MANAGEMENT_ID_KEY_PREFIX = 'integration_aws_auth:management-account:'
# regions ['*'] over an Organization: each member's enabled regions, kept this
# long (a region enabled since is collected within the hour).
MEMBER_REGIONS_TTL = 3600
MEMBER_REGIONS_KEY_PREFIX = 'integration_aws_auth:member-regions:'
SESSION_FIELDS = ('access_key', 'secret_key', 'token', 'expiry_time', 'issued')

# The STS region of each partition when the account names no region.
PARTITION_STS_REGION = {
    'aws': 'us-east-1',
    'aws-cn': 'cn-northwest-1',
    'aws-us-gov': 'us-gov-west-1',
}


class AccountConfigError(core.ConfigError):
    """The account dict is invalid; the message names the key and the fix."""


class AuthError(RuntimeError):
    """Credentials could not be obtained or were refused; one line, no secret.
    `code`: AWS's error code, when AWS answered."""

    def __init__(self, message, code=None):
        super().__init__(message)
        self.code = code


# --------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------

def get_session(account, region=None, *, regions=None, cache=None, clock=None,
                where='account', operations=None, text_timestamps=False, watch=None):
    """Return a boto3 Session for `account`, ready for clients in any region of
    its partition. `region` is the session's default region and the STS region
    (defaults to the first of `regions`, else the partition's STS region).
    `cache` has get(key) / set(key, value, expire=seconds) with string values;
    `clock` returns an aware UTC datetime (tests inject one). `watch`: a
    Cancellation's watch() for its STS clients (session.integration_watch
    changes it for a later run)."""
    account = validate_account(account, where)
    core.quiet_sdk_loggers()
    if regions:
        check_partition(regions, "collector_configs['regions']")
    region = region or (regions[0] if regions else None) or _role_region(account)
    check_role_partition(account, partition_of(region), where)
    bs = new_botocore_session(text_timestamps)
    bs.set_config_variable('region', region)
    method = auth_method(account)
    forget = None       # drops a kept temporary session (CollectorAccount.forget_refused)
    if method == 'access_key':
        bs.set_credentials(account['ak_id'], account['ak_secret'])
        binding = _Binding(('keys', account['ak_id'], _keyed_digest(account['ak_secret'])),
                           _seal_keys(account['ak_secret']), None, False)
    elif method != 'default_chain':
        fetcher = _TemporaryCredentialFetcher(
            account, bs, region, method,
            cache=cache if cache is not None else _default_cache(),
            clock=clock or _utcnow)
        fetcher.watch = watch
        bs._credentials = fetcher.refreshable_credentials()
        binding = fetcher.binding
        forget = fetcher.forget
    else:
        frozen = _require_default_chain(bs).get_frozen_credentials()
        binding = _Binding(('chain', frozen.access_key, _keyed_digest(frozen.secret_key)),
                           _seal_keys(frozen.secret_key), None, bool(frozen.token))
    session = _boto3_session(bs, region)
    session.integration_forget = forget
    session.integration_watch = (lambda watch: setattr(fetcher, 'watch', watch)) if forget else None
    # What a member account's session (member_session) is bound to: the base
    # credentials behind this one, never the secret itself. Assuming the
    # member roles is role chaining (1 hour at most) when these credentials
    # are a session: every method's but long-term keys (the account's, or the
    # default chain's from the environment or a profile).
    session.integration_binding = _Binding(
        ('via', method, account.get('assume_role_arn'), account.get('serial_number'), binding.key),
        binding.seal_keys, None,
        binding.chained if method in ('access_key', 'default_chain') else True)
    _limit_operations(bs, operations)
    return session


def member_session(management, account, member_id, cache=None, clock=None, watch=None,
                   operations=None, text_timestamps=False):
    """A boto3 Session in the member account `member_id` of an Organization:
    account['member_role_name'] assumed there (ExternalId
    account['member_external_id'], RoleSessionName account['role_session_name'])
    with the credentials of `management`, the session get_session made for
    `account`. When those are themselves a session (a role, MFA, an instance
    role), this is role chaining: AWS caps the member session at 1 hour. The
    session is cached and sealed like the management's, bound to its base.

    The Session object is the one the last run of the same member and base
    gave back (keep_member_sessions), when there is one: making one costs
    1-3 ms of CPU (botocore's handlers copied, its config chain built, boto3's
    handlers registered), per member account and run."""
    region = management.region_name
    partition = partition_of(region)
    member = {'assume_role_arn': f"arn:{partition}:iam::{member_id}:role/{account['member_role_name']}"}
    for key, member_key in (('member_external_id', 'external_id'),
                            ('role_session_name', 'role_session_name')):
        if account.get(key):
            member[member_key] = account[key]
    base = management.integration_binding
    binding = _Binding(base.key, base.seal_keys, management.get_credentials(), base.chained)
    key = _hash('member', member_id, base.key, member['assume_role_arn'], member.get('external_id'),
                region, text_timestamps,
                sorted((service, sorted(names)) for service, names in (operations or {}).items()),
                _sdk_state())
    session = _take_kept(_KEPT_SESSIONS, key)
    bs = session._session if session is not None else new_botocore_session(text_timestamps)
    if session is None:
        bs.set_config_variable('region', region)
    fetcher = _TemporaryCredentialFetcher(
        member, bs, region, 'member_role', cache=cache if cache is not None else _default_cache(),
        clock=clock or _utcnow, binding=binding)
    fetcher.watch = watch
    bs._credentials = fetcher.refreshable_credentials()
    if session is None:
        session = _boto3_session(bs, region)
        _limit_operations(bs, operations)
    session.integration_binding = _Binding(('member', member_id, base.key), base.seal_keys, None, True)
    session.integration_forget = fetcher.forget
    session.integration_key = key
    return session


def keep_member_sessions(sessions):
    """Give back member_session's sessions whose run is over, every thread of
    it ended: the next run of the same member and base takes them. A kept
    session holds no credentials (member_session gives it the next run's)."""
    kept = []
    for session in sessions:
        key = getattr(session, 'integration_key', None)
        if key is None:
            continue
        _forget_secrets(session._session)
        session.integration_binding = session.integration_forget = session.integration_key = None
        kept.append((key, session))
    _keep(_KEPT_SESSIONS, kept, KEPT_SESSIONS)


def _forget_secrets(bs):
    """What a botocore session holds of secrets, dropped: its credentials, its
    SSO bearer token (every create_client loads it), and the profiles it read
    from the config and credentials files (keys of the credentials file
    included), read again when next needed."""
    bs._credentials = None
    bs._auth_token = None
    bs._config = None
    bs._profile_map = None


def _boto3_session(bs, region):
    """A boto3 Session around a botocore session of new_botocore_session.
    boto3 appends its data folder to the loader's search path per session;
    the loader is shared and lives as long as the process (an Organization
    makes a session per member account and run): keep the path short."""
    session = boto3.session.Session(botocore_session=bs, region_name=region)
    paths = bs.get_component('data_loader').search_paths
    paths[:] = list(dict.fromkeys(paths))
    return session


def member_identity(account, member_id, partition):
    """Who a member session is, known without asking AWS: the role's session."""
    role = account['member_role_name'].split('/')[-1]
    name = account.get('role_session_name') or DEFAULT_ROLE_SESSION_NAME
    return {'method': 'member_role', 'account_id': member_id, 'partition': partition,
            'arn': f'arn:{partition}:sts::{member_id}:assumed-role/{role}/{name}'}


def describe_identity(session, account=None, region=None, cache=None, client=None,
                      keep_keys_for=None):
    """Who we are, for the run's banner: never a secret. One sts call, or none
    for a temporary session whose identity is already known (get_session
    keeps the answer when it shows a cached session to AWS). Long-term keys
    are checked each run, the call that turns revoked keys into one clear line
    per account, unless `keep_keys_for` seconds say how long their answer may
    be kept (an Organization's management keys: their calls to
    organizations:ListAccounts and sts:AssumeRole say as much)."""
    region = region or session.region_name
    creds = session.get_credentials()
    frozen = creds.get_frozen_credentials() if creds is not None else None
    cache = cache if cache is not None else _default_cache()
    key = None
    if frozen is not None and (frozen.token or keep_keys_for):
        key = _identity_key(frozen)
        cached = _read_record(cache, key, _valid_identity, 'identity')
        if cached:
            return cached
    # `client`: an STS client made beforehand, so that this may run in another
    # thread (clients are thread-safe; making them from one session is not).
    sts = client or session.client('sts', region_name=region)
    try:
        ident = sts.get_caller_identity()
    except ClientError as e:
        raise AuthError(describe_client_error(e, 'sts:GetCallerIdentity')) from None
    except BotoCoreError as e:
        raise AuthError(f'sts:GetCallerIdentity in {region} failed: {e}') from None
    method = auth_method(account) if account is not None else 'default_chain'
    if method == 'default_chain':
        # Which link of botocore's chain answered: 'iam-role' is the instance role.
        method = f"default_chain ({getattr(creds, 'method', 'unknown')})"
    result = _identity_of(method, ident, partition_of(region))
    expiry = getattr(creds, '_expiry_time', None)
    if key and expiry is not None:
        _remember_identity(cache, frozen.access_key, result, expiry - _utcnow())
    elif key:
        cache.set(key, json.dumps(result), expire=keep_keys_for)
    return result


def sdk_setting_given(name, bs=None):
    """Whether the user set botocore's configuration variable `name` (e.g.
    'max_attempts' through AWS_MAX_ATTEMPTS or `max_attempts` in the config
    file's profile), so that a collector's own default gives way to it: SDK
    settings are honoured, never overridden. botocore's defaults do not count.
    `bs`: a botocore session to read them from. Only its configuration is
    read: made without botocore's ~200 event handlers, one costs 0.4 ms, not 5."""
    bs = bs or botocore.session.Session(include_builtin_handlers=False)
    config_name, env_names = bs.session_var_map[name][:2]
    if isinstance(env_names, str):
        env_names = [env_names]
    if any(os.environ.get(env) for env in env_names or ()):
        return True
    if not config_name:
        return False
    try:
        return bs.get_scoped_config().get(config_name) is not None
    except BotoCoreError:     # a profile that does not exist: botocore itself says so
        return False


def auth_method(account):
    """The method the seed page's rules choose from the keys present."""
    has_keys = bool(account.get('ak_id'))
    role = bool(account.get('assume_role_arn'))
    mfa = bool(account.get('serial_number'))
    if not has_keys:
        return 'default_chain_assume_role' if role else 'default_chain'
    if mfa:
        return 'mfa_assume_role' if role else 'mfa_session'
    return 'assume_role' if role else 'access_key'


def describe_client_error(error, action):
    """One line from a botocore ClientError: the code, the message, the action.
    An error body botocore could not parse (XML where it expected JSON, from a
    proxy or an emulator) leaves it only the HTTP status: its <Code> and
    <Message>, when present, are taken from the raw text."""
    err = error.response.get('Error', {})
    code = err.get('Code', 'Unknown')
    raw = (err.get('Message') or '').strip()
    if code.isdigit() and raw.startswith('<'):
        found = {tag: re.search(f'<{tag}>([^<]*)</{tag}>', raw) for tag in ('Code', 'Message')}
        code = found['Code'].group(1) if found['Code'] else f'HTTP {code}'
        raw = found['Message'].group(1) if found['Message'] else ''
    message = raw.splitlines()[0:1]
    text = f'{action}: {code}'
    if message:
        text += f': {message[0]}'
    return text


# --------------------------------------------------------------------------
# Validation: one clear line per mistake, before any AWS call
# --------------------------------------------------------------------------

def validate_account(account, where='account'):
    """Check `account` against the seed page's rules and AWS's limits. Returns a
    copy in which blank optional values count as absent."""
    if not isinstance(account, dict):
        raise AccountConfigError(
            f'{where} must be a dict such as {{"ak_id": ..., "ak_secret": ...}}, '
            f'not {type(account).__name__}')
    core.check_keys(account, KNOWN_KEYS, where, AccountConfigError,
                    elsewhere=(COLLECTOR_CONFIG_KEYS, 'collector_configs'))
    out = {}
    for key, value in account.items():
        if key == 'extra_tags':
            out[key] = _check_extra_tags(value, where)
        elif key == 'exclude_accounts' and isinstance(value, (list, tuple)) and not value:
            pass                # excludes nothing (a template's empty list)
        elif key in ACCOUNT_LIST_KEYS:
            out[key] = _check_account_ids(value, f'{where}[{key!r}]')
        elif key == 'duration_seconds':
            if isinstance(value, bool) or not isinstance(value, int):
                raise AccountConfigError(
                    f"{where}['duration_seconds'] must be a whole number of seconds, "
                    f'not {type(value).__name__}')
            out[key] = value
        else:
            if not isinstance(value, str):
                raise AccountConfigError(
                    f'{where}[{key!r}] must be a string in quotes, not {type(value).__name__}'
                    + (": write the code as '012345'" if key == 'token_code' else ''))
            value = value.strip()
            if value.startswith('<') and value.endswith('>'):
                raise AccountConfigError(
                    f'{where}[{key!r}] still holds the placeholder from the documentation: '
                    'replace it with your value' + ('' if key in SECRET_KEYS else f' (got {value!r})'))
            if value:
                out[key] = value
    _check_combination(account, out, where)
    _check_formats(out, where)
    return out


def _check_combination(raw, acc, where):
    def missing(key, needs, fix):
        raise AccountConfigError(f'{where}[{key!r}] is set but {where}[{needs!r}] is missing: {fix}')

    for key in ('ak_id', 'ak_secret'):
        if key in raw and key not in acc:
            raise AccountConfigError(
                f'{where}[{key!r}] is empty: fill in the IAM user\'s access key, or remove '
                "ak_id and ak_secret to use the EC2 instance's IAM role")
    # Blank, these would quietly choose another way to sign in, or collect
    # this account alone (blank modifiers, such as external_id, count as absent).
    for key, fix in (('assume_role_arn', 'fill in the role to assume, or remove the key to use '
                                         'these credentials directly'),
                     ('serial_number', "fill in the MFA device's ARN, or remove serial_number and "
                                       'token_code to sign in without MFA'),
                     ('token_code', 'fill in the 6-digit code the MFA device shows now, or remove '
                                    'serial_number and token_code to sign in without MFA'),
                     ('member_role_name', "name the role to assume in every member account (e.g. "
                                          "'OrganizationReadOnly'), or remove the key to collect "
                                          'only this account')):
        if key in raw and key not in acc:
            raise AccountConfigError(f'{where}[{key!r}] is empty: {fix}')
    secret = acc.get('ak_secret', '')
    if any(c.isspace() or not c.isprintable() or not c.isascii() for c in secret):
        # Never shown: which kind of character is enough to find it.
        kind = ('a line break' if any(c in '\r\n' for c in secret) else 'a space' if ' ' in secret
                else 'a character outside ASCII' if not secret.isascii() else 'a control character')
        raise AccountConfigError(
            f"{where}['ak_secret'] has {kind} inside it ({len(secret)} characters): copy the "
            'secret access key again (40 characters of letters, digits, + and /)')
    if 'ak_id' in acc and 'ak_secret' not in acc:
        missing('ak_id', 'ak_secret', 'add the secret access key that belongs to this key id')
    if 'ak_secret' in acc and 'ak_id' not in acc:
        missing('ak_secret', 'ak_id', 'add the access key id that belongs to this secret')
    if 'token_code' in acc and 'serial_number' not in acc:
        missing('token_code', 'serial_number', 'add the MFA device\'s ARN or serial number')
    if 'serial_number' in acc and 'token_code' not in acc:
        missing('serial_number', 'token_code', 'add the 6-digit code the MFA device shows now')
    if 'serial_number' in acc and 'ak_id' not in acc:
        missing('serial_number', 'ak_id', 'MFA needs the IAM user\'s keys (ak_id and ak_secret) of the device\'s owner')
    if 'external_id' in acc and 'assume_role_arn' not in acc:
        missing('external_id', 'assume_role_arn', (
            "the member roles' ExternalId is account['member_external_id']: rename the key; "
            if 'member_role_name' in acc else '') + 'add the role to assume, or remove this key')
    if 'role_session_name' in acc and not ('assume_role_arn' in acc or 'member_role_name' in acc):
        missing('role_session_name', 'assume_role_arn', 'add the role to assume, or remove this key')
    for key in ('member_external_id',) + ACCOUNT_LIST_KEYS:
        if key in acc and 'member_role_name' not in acc:
            missing(key, 'member_role_name', "name the role to assume in every member account "
                    "(e.g. 'OrganizationReadOnly'), or remove this key")
    if 'member_accounts' in acc and 'exclude_accounts' in acc:
        both = sorted(set(acc['member_accounts']) & set(acc['exclude_accounts']))
        if both:
            raise AccountConfigError(f"{where}['exclude_accounts'] excludes {', '.join(both)}, which "
                                     f"{where}['member_accounts'] lists: keep it in one of them")
    if 'duration_seconds' in acc and not ('assume_role_arn' in acc or 'serial_number' in acc):
        raise AccountConfigError(
            f"{where}['duration_seconds'] only applies to temporary sessions "
            '(assume_role_arn or serial_number): remove it')


# What each string key must look like, and what to say when it does not
# (secrets are described by their length, never shown).
FORMATS = (
    ('ak_id', ACCESS_KEY_ID_RE, lambda v: 'is not an access key id (16-128 capital letters and '
                                           'digits, e.g. AKIA...): copy it from the IAM console'),
    ('assume_role_arn', ROLE_ARN_RE, lambda v: f'is not a role ARN (got {v!r}): expected '
                                               'arn:<partition>:iam::<12-digit account id>:role/<name>, '
                                               'the name 1-64 characters of ASCII letters, digits and '
                                               "+=,.@_-, after an optional path such as 'team/'"),
    ('role_session_name', SESSION_NAME_RE, lambda v: (
        f'must be 2-64 characters of ASCII letters, digits and +=,.@_- (got {v!r}); '
        f'the default is {DEFAULT_ROLE_SESSION_NAME!r}')),
    ('external_id', EXTERNAL_ID_RE, lambda v: (
        f'must be 2-1224 characters of ASCII letters, digits and +=,.@:/_- (got {len(v)} characters): '
        "copy it from the role's trust policy")),
    ('serial_number', SERIAL_NUMBER_RE, lambda v: (
        "must be the MFA device's ARN (arn:aws:iam::123456789012:mfa/NAME) or hardware serial, "
        f'9-256 characters (got {v!r})')),
    ('token_code', TOKEN_CODE_RE, lambda v: (
        'must be exactly 6 digits, the code the MFA device shows now (got '
        + (f'{len(v)} characters)' if len(v) != 6 else '6 characters, not all of them 0-9)'))),
    ('member_role_name', ROLE_NAME_RE, lambda v: (
        'must be a role name (1-64 characters of ASCII letters, digits and +=,.@_-, optionally '
        "after a path such as 'audit/')" + (', not an ARN' if v.startswith('arn:') else '')
        + f' (got {v!r}): the role is assumed as '
        "arn:<partition>:iam::<member id>:role/<member_role_name> in every member account")),
    ('member_external_id', EXTERNAL_ID_RE, lambda v: (
        f'must be 2-1224 characters of ASCII letters, digits and +=,.@:/_- (got {len(v)} characters): '
        "copy it from the member roles' trust policy")),
)


def _check_account_ids(value, where):
    """A list of 12-digit account ids (strings), each once."""
    if isinstance(value, str) or not isinstance(value, (list, tuple)) or not value:
        raise AccountConfigError(f"{where} must be a non-empty list of 12-digit account ids in quotes, "
                                 "e.g. ['111122223333']")
    out = []
    for index, item in enumerate(value):
        if not isinstance(item, str) or not ACCOUNT_ID_RE.match(item.strip()):
            shown = item if isinstance(item, str) else f'{item!r} ({type(item).__name__})'
            raise AccountConfigError(f'{where}[{index}] must be a 12-digit account id in quotes, '
                                     f"e.g. '111122223333', digits 0-9 only (got {shown})")
        if item.strip() in out:
            raise AccountConfigError(f'{where}[{index}] lists {item.strip()} a second time')
        out.append(item.strip())
    return out


def _check_formats(acc, where):
    for key, pattern, explain in FORMATS:
        if key in acc and not pattern.match(acc[key]):
            raise AccountConfigError(f'{where}[{key!r}] {explain(acc[key])}')
    # A path named role/ is possible, but this is the ARN's own 'role/' copied
    # along: every member would fail at its AssumeRole, one line each.
    if acc.get('member_role_name', '').startswith('role/'):
        name = acc['member_role_name']
        raise AccountConfigError(
            f"{where}['member_role_name'] is {name!r}: give the role's name without 'role/', "
            f"{name[5:]!r} (the role is assumed as arn:<partition>:iam::<member id>:role/"
            '<member_role_name>)')
    if 'duration_seconds' in acc:
        role = 'assume_role_arn' in acc
        lo, hi = ROLE_DURATION if role else SESSION_TOKEN_DURATION
        if not lo <= acc['duration_seconds'] <= hi:
            raise AccountConfigError(
                f"{where}['duration_seconds'] must be between {lo} and {hi} for "
                f"{'sts:AssumeRole' if role else 'sts:GetSessionToken'} "
                f"(got {acc['duration_seconds']})")


def _check_extra_tags(tags, where):
    if not isinstance(tags, dict):
        raise AccountConfigError(
            f"{where}['extra_tags'] must be a dict of strings such as "
            f'{{"account_name": "prod"}}, not {type(tags).__name__}')
    for key, value in tags.items():
        if not isinstance(key, str) or not key.strip():
            raise AccountConfigError(f"{where}['extra_tags'] has the key {key!r}: keys must be non-empty strings")
        if not isinstance(value, str):
            raise AccountConfigError(
                f"{where}['extra_tags'][{key!r}] must be a string, not {type(value).__name__}: "
                'put the value in quotes')
        if key == 'cloud_provider':
            raise AccountConfigError(
                f"{where}['extra_tags'] must not contain 'cloud_provider': every point already "
                "carries cloud_provider=AWS; remove it or use another key")
        if key != key.strip():
            raise AccountConfigError(
                f"{where}['extra_tags'] has the key {key!r}, with a space at its start or end: "
                f"remove the space (it would be a tag apart from {key.strip()!r})")
        if key.endswith('\\'):
            raise AccountConfigError(
                f"{where}['extra_tags'] has the key {key!r}: line protocol cannot carry a tag key "
                'that ends with a backslash; rename it')
        if key == 'time':
            raise AccountConfigError(
                f"{where}['extra_tags'] has the key 'time', which line protocol reserves for "
                "the timestamp (InfluxDB refuses such points): rename it, e.g. 'time_zone'")
    return dict(tags)


# --------------------------------------------------------------------------
# Partitions
# --------------------------------------------------------------------------

_SHARED_MODULE = '_integration_aws_shared'


def process_shared():
    """What this module keeps for the life of the process: the botocore data
    loader (its parsed service models cost 0.1-0.3 s of CPU per session made
    from scratch) and the region tables. Func runs every module body again
    in every task, so module globals would not outlive a task; sys.modules
    does. Nothing in it holds credentials or anything of one account (the
    clients kept between runs hold none while kept: see keep_clients)."""
    shared = sys.modules.get(_SHARED_MODULE)
    if shared is None:
        module = types.ModuleType(_SHARED_MODULE, 'integration_aws_auth: per-process state')
        module.lock = threading.Lock()
        module.data = {}
        shared = sys.modules.setdefault(_SHARED_MODULE, module)
    return shared


# Clients kept between runs of one process (a Func worker runs the same
# startup script every few minutes): at most KEPT_CLIENTS (about 150 KiB
# each), none idle longer than KEPT_CLIENT_IDLE seconds.
KEPT_CLIENTS = 256
KEPT_CLIENT_IDLE = 3600
# And the sessions of an Organization's member accounts (member_session),
# about 130 KiB each, with the same idle limit.
KEPT_SESSIONS = 256
_KEPT_CLIENTS, _KEPT_SESSIONS = 'kept_clients.v1', 'kept_sessions.v1'
_PROXY_VARIABLES = ('http_proxy', 'https_proxy', 'no_proxy', 'all_proxy')
_CREDENTIAL_VARIABLES = ('AWS_ACCESS_KEY_ID', 'AWS_SECRET_ACCESS_KEY', 'AWS_SESSION_TOKEN',
                         'AWS_SECURITY_TOKEN')


def take_client(session, service, region, config):
    """A client of `session` (made by get_session or member_session) for
    `service` in `region`: the one an earlier run of the same credentials
    gave back (keep_clients), now signing with this session's credentials,
    or else a new one. Making a client costs botocore 1.5-3 ms of CPU (its
    event handlers copied, its endpoint and TLS context made), on the path
    of every region's first request, and an Organization makes one per
    account and region."""
    key = _client_key(session, service, region, config)
    client = _take_kept(_KEPT_CLIENTS, key) if key is not None else None
    if client is not None:
        _bind_credentials(client, session._session)
    else:
        client = session.client(service, region_name=region, config=config)
    client._integration_key = key
    return client


def keep_clients(clients):
    """Give back clients of take_client whose run is over, every thread of
    it ended: the next run of the same credentials takes them. A kept client
    holds no credentials (take_client gives it the next run's)."""
    kept = []
    for client in clients:
        key = getattr(client, '_integration_key', None)
        if key is None or not hasattr(getattr(client, '_request_signer', None), '_credentials'):
            continue
        _bind_credentials(client, None)
        kept.append((key, client))
    _keep(_KEPT_CLIENTS, kept, KEPT_CLIENTS)


def _take_kept(store, key):
    """What _keep() gave back under `key` to process_shared's `store`, taken
    out (no other run can take it meanwhile); None when there is none, or it
    was idle too long (then closed)."""
    shared = process_shared()
    with shared.lock:
        entry = shared.data.get(store, {}).pop(key, None)
    if entry is None:
        return None
    if entry[0] < time.monotonic() - KEPT_CLIENT_IDLE:
        getattr(entry[1], 'close', lambda: None)()
        return None
    return entry[1]


def _keep(store, items, limit):
    """Keep (key, object) pairs, already stripped of credentials, in
    process_shared's `store`: at most `limit`, none idle longer than
    KEPT_CLIENT_IDLE seconds, the oldest dropped (and closed) first."""
    now = time.monotonic()
    shared = process_shared()
    dropped = []
    with shared.lock:
        kept = shared.data.setdefault(store, collections.OrderedDict())
        for key, value in items:
            previous = kept.pop(key, None)      # two runs of the same key at once
            if previous is not None and previous[1] is not value:
                dropped.append(previous[1])
            kept[key] = (now, value)
        while kept and (len(kept) > limit or next(iter(kept.values()))[0] < now - KEPT_CLIENT_IDLE):
            dropped.append(kept.popitem(last=False)[1][1])
    for value in dropped:
        getattr(value, 'close', lambda: None)()


def _bind_credentials(client, bs):
    """Sign with the credentials of the botocore session `bs` (None: with
    none). Where a botocore client holds them: its request signer (the
    credentials, and the SSO bearer token of a profile with sso_session), and
    the endpoint rules' account id (a deferred read of the credentials)."""
    credentials = bs.get_credentials() if bs is not None else None
    signer = client._request_signer
    signer._credentials = credentials
    if hasattr(signer, '_auth_token'):
        signer._auth_token = bs.get_auth_token() if bs is not None else None
    builtins = getattr(getattr(client, '_ruleset_resolver', None), '_builtins', None)
    if isinstance(builtins, dict) and _ACCOUNT_ID_BUILTIN in builtins:
        builtins[_ACCOUNT_ID_BUILTIN] = (credentials.get_deferred_property('account_id')
                                         if credentials is not None else None)


_ACCOUNT_ID_BUILTIN = 'AWS::Auth::AccountId'
_CODE_VERSION = {}          # per execution of this module body (per Func task)


def _code_version():
    """A digest of the code of this module and of the core, the same for the
    same source (Func runs the body again in every task), another for
    another version."""
    version = _CODE_VERSION.get('digest')
    if version is None:
        digest = hashlib.sha256()
        for namespace in (globals(), vars(core)):
            for value in list(namespace.values()):
                if getattr(value, '__module__', None) != namespace.get('__name__'):
                    continue
                if isinstance(value, types.FunctionType):
                    digest.update(_code_text(value.__code__))
                elif isinstance(value, type):
                    for member in vars(value).values():
                        if isinstance(member, types.FunctionType):
                            digest.update(_code_text(member.__code__))
        version = _CODE_VERSION['digest'] = digest.hexdigest()
    return version


def _code_text(code):
    parts = [code.co_code, repr(code.co_names).encode()]
    for const in code.co_consts:
        parts.append(_code_text(const) if isinstance(const, types.CodeType)
                     else repr(const).encode('utf-8', 'backslashreplace'))
    return b'\0'.join(parts)


def _client_key(session, service, region, config):
    """What a kept client must share with the one asked for: the credentials'
    source (get_session's binding: no secret in it), the operations its model
    holds, its service, region and Config, the SDK's environment (endpoint
    URLs, proxies, CA bundle ...) and config file, and the code of this module
    and the core (a new version pasted into Func makes new clients). A
    digest: the key names no account. None: not a session of ours, or a
    Config we cannot compare: a new client."""
    binding = getattr(session, 'integration_binding', None)
    options = getattr(config, '_user_provided_options', None) if config is not None else {}
    if binding is None or options is None:
        return None
    loader = session._session.get_component('data_loader')
    operations = sorted(getattr(loader, '_operations', {}).items())
    parsing = getattr(session._session.get_component('response_parser_factory'),
                      'text_timestamps', None)
    text = repr((binding.key, operations, parsing, service, region, sorted(options.items(), key=repr),
                 _sdk_state()))
    return hashlib.sha256(text.encode('utf-8', 'surrogatepass')).hexdigest()


def _sdk_state():
    """What else a kept client or session must share with the one asked for:
    the SDK's settings in the environment (endpoint URLs, proxies, CA bundle
    ...; not its credentials, which a binding stands for, so that a key is
    derived from no secret at all), its config file as it is now, and the
    code of this module and the core (a new version pasted into Func makes
    new ones)."""
    environment = sorted((name, value) for name, value in os.environ.items()
                         if (name.startswith('AWS_') and name not in _CREDENTIAL_VARIABLES)
                         or name.lower() in _PROXY_VARIABLES)
    config_file = os.path.expanduser(os.environ.get('AWS_CONFIG_FILE') or '~/.aws/config')
    try:
        stat = os.stat(config_file)
        config_state = (config_file, stat.st_mtime_ns, stat.st_size)
    except OSError:
        config_state = (config_file, None)
    return environment, config_state, _code_version()


def new_botocore_session(text_timestamps=False):
    """A botocore session sharing one data loader per process: the service
    models are parsed once, not per run. Its event handlers are a copy of
    botocore's built-in ones, registered once per process: registering them
    (about 120, each signature inspected) costs 4-5 ms of CPU a session, and
    an Organization makes one session per member account. The copy is the
    session's own, as botocore's would be (nothing registered on one session
    reaches another)."""
    shared = process_shared()
    with shared.lock:
        handlers = shared.data.get('handlers')
        if handlers is None:
            handlers = shared.data['handlers'] = _builtin_handlers()
    if handlers is False:
        bs = botocore.session.Session()
    else:
        bs = botocore.session.Session(event_hooks=copy.copy(handlers), include_builtin_handlers=False)
    with shared.lock:
        loader = shared.data.setdefault('loader', bs.get_component('data_loader'))
    bs.register_component('data_loader', loader)
    factory = FastParserFactory(text_timestamps)
    factory.set_parser_defaults(timestamp_parser=fast_timestamp)
    bs.register_component('response_parser_factory', factory)
    return bs


def _builtin_handlers():
    """botocore's built-in event handlers, as a session registers them, and
    nothing else: not the handlers of botocore.register_initializer, which
    every new session, ours included, runs itself (private botocore API, the
    same from 1.37 to 1.44; False without it: sessions made as botocore does)."""
    try:
        from botocore.hooks import EventAliaser, HierarchicalEmitter
        proto = botocore.session.Session.__new__(botocore.session.Session)
        proto._original_handler = HierarchicalEmitter()
        proto._events = EventAliaser(proto._original_handler)
        proto._register_builtin_handlers(proto._events)
        return proto._original_handler
    except (ImportError, AttributeError, TypeError):
        return False


def fast_timestamp(value):
    """botocore's timestamp parser goes through dateutil (about 0.5 ms each, half
    of parsing an EC2 instance); AWS sends ISO-8601 (query and XML protocols)
    or epoch seconds (JSON and CBOR: CloudWatch on botocore 1.38+), which the
    standard library reads in microseconds. Anything else goes to botocore's."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return datetime.datetime.fromtimestamp(value, datetime.timezone.utc)
    try:
        parsed = datetime.datetime.fromisoformat(value.replace('Z', '+00:00'))
        if parsed.tzinfo is not None:
            return parsed
    except (AttributeError, ValueError):
        pass
    return botocore.utils.parse_timestamp(value)


# AWS's own form of a time in XML, 2021-10-26T07:00:44.000Z (or without the
# milliseconds; ASCII digits, a year from 1000): its iso_time text is a slice
# of it.
_AWS_TIME = re.compile(r'[1-9][0-9]{3}-[0-9]{2}-[0-9]{2}T([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](\.000)?Z')


def text_timestamp(value):
    """A response's timestamp as iso_time's text (FastParserFactory's
    text_timestamps)."""
    if isinstance(value, str) and _AWS_TIME.fullmatch(value):
        try:
            datetime.date.fromisoformat(value[:10])     # a day that exists
            return value[:19] + 'Z'
        except ValueError:
            pass        # refused below, with the message the datetime path gives
    return iso_time(fast_timestamp(value))


def iso_time(value):
    """2026-11-29T10:00:00Z, or with microseconds 2026-11-29T10:00:00.250000Z
    (in UTC); a text is taken as one already."""
    if isinstance(value, str):
        return value
    if value.tzinfo is not datetime.timezone.utc:
        value = value.astimezone(datetime.timezone.utc)
    if value.year < 1000:       # never from AWS: strftime's unpadded year, as before
        return value.strftime('%Y-%m-%dT%H:%M:%S.%fZ' if value.microsecond else '%Y-%m-%dT%H:%M:%SZ')
    return value.isoformat()[:-6] + 'Z'      # '+00:00' off; 5x strftime's speed


class FastParserFactory(botocore.parsers.ResponseParserFactory):
    """The response parsers of the sessions made here: botocore's, but for the
    XML of the query protocols (EC2, STS, and CloudWatch before botocore 1.38)
    a structure is read from the elements present, not from every member of
    its shape (see FastXMLStructures). Other protocols: botocore's parsers.

    text_timestamps: EC2's timestamps (its protocol is its own) come as the
    text iso_time makes of them, for a collector that writes them as text:
    a datetime made and then written back costs as much as a third of making
    an instance's point."""

    def __init__(self, text_timestamps=False):
        super().__init__()
        self.text_timestamps = text_timestamps

    def create_parser(self, protocol_name):
        parser_cls = FAST_XML_PARSERS.get(protocol_name)
        if parser_cls is None:
            return super().create_parser(protocol_name)
        if self.text_timestamps and protocol_name == 'ec2':
            return parser_cls(**dict(self._defaults, timestamp_parser=text_timestamp))
        return parser_cls(**self._defaults)


class FastXMLStructures:
    """botocore reads an XML structure by going through every member of its
    shape (EC2's Instance has about 60, each with a few lookups) for the few
    elements present: two thirds of parsing a DescribeInstances page, the
    largest CPU cost of a collection. This reads the elements present, each
    through a plan made once per shape and process: the same result, member
    order included (the `message` field is the instance's JSON).

    A shape this does not cover exactly (XML attributes, members read from
    headers, error and union shapes, flattened maps) is botocore's to read."""

    def _handle_structure(self, shape, node):
        plan = _xml_plan(shape)
        if plan is None or not hasattr(node, 'tag'):
            return super()._handle_structure(shape, node)
        return self._read_structure(plan, node)

    def _read_structure(self, plan, node):
        parsed = {}
        by_tag = plan.by_tag
        last, ordered = -1, True
        for child in node:
            member = by_tag.get(child.tag, False)
            if member is False:             # a tag not seen yet
                member = plan.learn(child.tag)
            if member is None:
                continue                    # an element the model does not know
            kind, name, position = member.kind, member.name, member.position
            if kind == _FLAT_LIST:
                items = parsed.get(name)
                if items is not None:
                    items.append(self._read_value(member.item, child))
                    continue
                parsed[name] = [self._read_value(member.item, child)]
            elif name in parsed:
                # A member's element twice, which AWS does not send: botocore's
                # reading of it, whatever that gives.
                return super()._handle_structure(plan.shape, node)
            elif kind == _TEXT:
                text = child.text
                parsed[name] = '' if text is None else text
            elif kind == _TIMESTAMP:
                text = child.text
                parsed[name] = self._timestamp_parser('' if text is None else text)
            elif kind == _STRUCTURE:
                parsed[name] = self._read_member_structure(member, child)
            elif kind == _LIST:
                item = member.item
                if item.kind == _STRUCTURE:
                    parsed[name] = [self._read_member_structure(item, each) for each in child]
                elif item.kind == _TEXT:
                    parsed[name] = ['' if each.text is None else each.text for each in child]
                else:
                    parsed[name] = [self._read_value(item, each) for each in child]
            else:
                parsed[name] = self._read_value(member, child)
            if position < last:
                ordered = False
            last = position
        if not ordered:
            parsed = {name: parsed[name] for name in plan.order if name in parsed}
        return parsed

    def _read_member_structure(self, member, node):
        plan = member.plan
        if plan is None:
            plan = member.plan = _xml_plan(member.shape) or False
        if plan is False:
            return super()._handle_structure(member.shape, node)
        return self._read_structure(plan, node)

    def _read_value(self, member, node):
        kind = member.kind
        if kind == _STRUCTURE:
            return self._read_member_structure(member, node)
        text = node.text
        if text is None:
            text = ''
        if kind == _TEXT:
            return text
        if kind == _BOOLEAN:
            return text == 'true'
        if kind == _INTEGER:
            return int(text)
        if kind == _FLOAT:
            return float(text)
        if kind == _TIMESTAMP:
            return self._timestamp_parser(text)
        return self._parse_shape(member.shape, node)     # blobs, maps, nested lists


class FastQueryParser(FastXMLStructures, botocore.parsers.QueryParser):
    pass


class FastEC2QueryParser(FastXMLStructures, botocore.parsers.EC2QueryParser):
    pass


FAST_XML_PARSERS = {'query': FastQueryParser, 'ec2': FastEC2QueryParser}

# Kinds of plan entries: numbers, compared with ==, as plans outlive the module
# body that made them (Func runs it again in every task; see _xml_plan).
_TEXT, _STRUCTURE, _BOOLEAN, _INTEGER, _FLOAT, _TIMESTAMP, _OTHER, _LIST, _FLAT_LIST = 0, 1, 2, 3, 4, 5, 6, 7, 8
_SCALAR_KINDS = {'string': _TEXT, 'character': _TEXT, 'boolean': _BOOLEAN, 'integer': _INTEGER,
                 'long': _INTEGER, 'float': _FLOAT, 'double': _FLOAT, 'timestamp': _TIMESTAMP}
_PLAN_TAGS = 256            # element names remembered per shape (namespaces are few)


class _XMLPlan:
    """How to read one structure shape: its members by element name."""

    def __init__(self, shape, by_name, order):
        self.shape = shape
        self.by_name = by_name          # local element name -> _XMLMember
        self.order = order              # member names in the shape's order
        self.by_tag = {}                # element tag as parsed ({namespace}name) -> _XMLMember

    def learn(self, tag):
        member = self.by_name.get(tag.rpartition('}')[2] if tag[:1] == '{' else tag)
        if len(self.by_tag) < _PLAN_TAGS:
            self.by_tag[tag] = member
        return member


class _XMLMember:
    """A member of a plan, or the items of a list member (`item`)."""
    __slots__ = ('position', 'name', 'kind', 'shape', 'item', 'plan')

    def __init__(self, position, name, kind, shape, item=None):
        self.position, self.name, self.kind, self.shape, self.item = position, name, kind, shape, item
        self.plan = None        # a structure's own plan, once read (False: botocore's to read)


def _xml_plan(shape):
    """The plan of a structure shape, made once per process (None when
    FastXMLStructures leaves the shape to botocore). It is keyed by the shape's
    `members` dict in the service model as loaded: every ServiceModel's copy
    of the shape shares it (botocore copies a shape whose reference adds
    traits, as the query protocol's resultWrapper does, for every client)."""
    model = getattr(shape, '_shape_model', None)
    members = model.get('members') if isinstance(model, dict) else None
    if members is None:
        return None
    plans = process_shared().data.setdefault(('xml_plans', _code_version()), {})
    entry = plans.get(id(members))
    if entry is not None and entry[0] is members:
        return entry[1]
    plan = _make_xml_plan(shape)
    plans[id(members)] = (members, plan)    # the dict kept alive: its id stays its own
    return plan


def _make_xml_plan(shape):
    if (shape.metadata.get('exception') or getattr(shape, 'is_tagged_union', False)
            or getattr(shape, 'is_document_type', False)):
        return None
    by_name, order = {}, []
    for position, (name, member) in enumerate(shape.members.items()):
        serialization = member.serialization
        if ('location' in serialization or 'eventheader' in serialization
                or serialization.get('xmlAttribute')):
            return None
        kind = _value_kind(member)
        if kind is None:
            return None
        xml_name = serialization.get('name') or name
        item = None
        if member.type_name == 'list':
            item_kind = _value_kind(member.member)
            if item_kind is None or member.member.type_name == 'list':
                item_kind = _OTHER
            item = _XMLMember(None, None, item_kind, member.member)
            if serialization.get('flattened'):
                xml_name = member.member.serialization.get('name') or xml_name
                kind = _FLAT_LIST
            else:
                kind = _LIST
        by_name[xml_name] = _XMLMember(position, name, kind, member, item)
        order.append(name)
    if len(by_name) != len(order):
        return None                     # two members under one element name
    return _XMLPlan(shape, by_name, order)


def _value_kind(shape):
    if shape.type_name == 'structure':
        return _STRUCTURE
    if shape.type_name == 'map' and shape.serialization.get('flattened'):
        return None                     # its entries are repeated elements of the parent
    return _SCALAR_KINDS.get(shape.type_name, _OTHER)


class _LimitedLoader:
    """A session's data loader whose service models, for the services named in
    `operations`, hold only those operations and the shapes they use.

    botocore makes a client class afresh for every client, with a method per
    operation of the service: 830 for EC2, about 10 ms of CPU a client, which a
    collection of 20 regions pays 20 times before its last region's request
    leaves. With two operations a client takes about 1.5 ms. Anything else is
    the shared loader's; a limited model is cached in process_shared, as it
    holds nothing of an account (its parts are the shared model's own)."""

    def __init__(self, loader, operations):
        self._loader = loader
        self._operations = {service: tuple(sorted(set(names)))
                            for service, names in operations.items()}

    def load_service_model(self, service_name, type_name, api_version=None):
        model = self._loader.load_service_model(service_name, type_name, api_version)
        names = self._operations.get(service_name)
        if type_name != 'service-2' or not names:
            return model
        shared = process_shared()
        key = ('limited_model', service_name, api_version, names, _code_version())
        entry = shared.data.get(key)
        if entry is None or entry[0] is not model:
            entry = (model, limited_model(model, names))
            with shared.lock:
                shared.data[key] = entry
        return entry[1]

    def __getattr__(self, name):
        return getattr(self._loader, name)


def limited_model(model, operations):
    """A botocore service model (its JSON, as loaded) with only `operations` and
    the shapes they reach; the whole model when it lacks one of them (an older
    botocore: its client then says which operation it does not know)."""
    if not all(name in model['operations'] for name in operations):
        return model
    shapes = model['shapes']
    kept_operations = {name: model['operations'][name] for name in operations}
    pending = []
    for operation in kept_operations.values():
        refs = [operation.get('input'), operation.get('output')] + list(operation.get('errors', ()))
        pending.extend(ref['shape'] for ref in refs if ref)
    kept = {}
    while pending:
        name = pending.pop()
        if name in kept:
            continue
        shape = kept[name] = shapes[name]
        pending.extend(shape[part]['shape'] for part in ('member', 'key', 'value') if part in shape)
        pending.extend(member['shape'] for member in shape.get('members', {}).values())
    return dict(model, operations=kept_operations, shapes=kept)


def _limit_operations(bs, operations):
    """Give a botocore session made here (get_session, member_session) the
    limited loader, after boto3 took the shared one for its own use."""
    if operations:
        bs.register_component('data_loader', _LimitedLoader(bs.get_component('data_loader'),
                                                            operations))


def _endpoint_data():
    """botocore's partition and region tables, loaded once per process."""
    shared = process_shared()
    with shared.lock:
        data = shared.data
        # A worker that ran the version before has its tables with the whole
        # session that made them (holding the credentials file's keys): made
        # again, and that session dropped.
        if 'endpoint_resolver' not in data or 'regions' not in data:
            data.pop('endpoint_session', None)
            bs = botocore.session.Session()   # not new_botocore_session(): it takes this lock
            bs.register_component('data_loader', data.setdefault(
                'loader', bs.get_component('data_loader')))
            regions = {}
            for partition in bs.get_available_partitions():
                for name in bs.get_available_regions('ec2', partition):
                    regions[name] = partition
            # Only its resolver is kept: the session read the user's config
            # and credentials files (for its data path), secrets included.
            data['endpoint_resolver'] = bs._get_internal_component('endpoint_resolver')
            data['regions'] = regions
        return data


def known_regions():
    """{region: partition} for every region botocore knows for EC2."""
    return dict(_endpoint_data()['regions'])


def partition_of(region):
    data = _endpoint_data()
    return data['regions'].get(region) or data['endpoint_resolver'].get_partition_for_region(region)


def check_regions(regions, where):
    if regions is None:
        raise core.ConfigError(f"{where} is missing: list the regions to collect, e.g. "
                               "['cn-northwest-1'], or ['*'] for every enabled region")
    if isinstance(regions, str) or not isinstance(regions, (list, tuple)):
        raise core.ConfigError(f"{where} must be a list such as ['cn-northwest-1'], "
                               f'not {type(regions).__name__}')
    if not regions:
        raise core.ConfigError(f"{where} is empty: list at least one region, or ['*']")
    known = known_regions()
    out = []
    for index, region in enumerate(regions):
        if not isinstance(region, str):
            raise core.ConfigError(f'{where}[{index}] must be a region id string, '
                                   f'not {type(region).__name__}')
        region = region.strip()
        if region == '*':
            if len(regions) > 1:
                raise core.ConfigError(f"{where}[{index}]: '*' means every enabled region and "
                                       'must be the only entry')
        elif region not in known:
            near = difflib.get_close_matches(region, list(known), n=1, cutoff=0.7)
            raise core.ConfigError(f'{where}[{index}] {region!r} is not an AWS region' + (
                f'; did you mean {near[0]!r}?' if near else "; e.g. 'us-east-1', 'cn-northwest-1'"))
        if region not in out:
            out.append(region)
    return out


def check_partition(regions, where):
    """The one partition all `regions` belong to; two partitions is an error."""
    found = {}
    for region in regions:
        found.setdefault(partition_of(region), region)
    if len(found) > 1:
        pairs = ', '.join(f'{r} ({p})' for p, r in found.items())
        raise AccountConfigError(
            f'{where} mixes partitions: {pairs}. Keys of one partition do not work in '
            'another: split them into one collector per partition, each with its own account')
    return next(iter(found))


def check_role_partition(account, partition, where='account'):
    arn = account.get('assume_role_arn')
    role_partition = ROLE_ARN_RE.match(arn).group(1) if arn else partition
    if role_partition != partition:
        raise AccountConfigError(
            f"{where}['assume_role_arn'] is in partition '{role_partition}' but the regions "
            f"are in '{partition}': roles of one partition cannot be used in another; use a "
            "role of the regions' partition, or regions of the role's")
    device_partition = _device_partition(account) or partition
    if device_partition != partition:
        raise AccountConfigError(
            f"{where}['serial_number'] is an MFA device of partition '{device_partition}' but the "
            f"regions are in '{partition}': use the device of the regions' partition, or regions "
            "of the device's")


def _device_partition(account):
    """The partition of account['serial_number'] when it is a device ARN of a
    known partition (a hardware serial tells none)."""
    parts = account.get('serial_number', '').split(':')
    if len(parts) >= 6 and parts[0] == 'arn' and parts[1] in PARTITION_STS_REGION:
        return parts[1]
    return None


def _role_region(account):
    arn = account.get('assume_role_arn')
    partition = ROLE_ARN_RE.match(arn).group(1) if arn else 'aws'
    return PARTITION_STS_REGION.get(partition, 'us-east-1')


# --------------------------------------------------------------------------
# Temporary credentials: STS, the cache, the MFA rules
# --------------------------------------------------------------------------

class _TemporaryCredentialFetcher:
    """Gets temporary credentials for one account: from the cache while they
    are fresh (see margins), else from STS. botocore calls `fetch` again
    before expiry (RefreshableCredentials), so long runs never see
    ExpiredToken.

    The cache is shared (every script importing this module in Func shares
    its DFF.CACHE scope), so a session is filed under a key bound to the base
    credentials that obtained it: ak_id and a keyed hash of ak_secret, or the
    default chain's access key and a keyed hash of its secret. Whoever
    presents other credentials finds nothing and asks STS, which judges. The
    record itself is sealed with keys derived from that same secret (see
    _seal): the cache never holds a temporary secret in the clear. For the
    default chain the secret is the chain's own (the instance role's), which
    AWS rotates: a rotation simply files the next session under a new key,
    at the cost of one AssumeRole.

    MFA: a code is sent at most once. The codes sent are kept per device
    (and base credentials), whatever the role, session name or duration."""

    def __init__(self, account, botocore_session, region, method, cache, clock, binding=None):
        self.account = account
        self.bs = botocore_session
        self.region = region
        self.method = method
        self.cache = cache
        self.clock = clock
        self.partition = partition_of(region)
        self.base_credentials = None
        if binding is not None:
            # A member account's role, assumed with the management session's
            # credentials: filed and sealed under the management's own base.
            self.base_credentials = binding.credentials
            base = binding.key
            self._seal_keys = binding.seal_keys
            self.chained = binding.chained
        elif method.startswith('default_chain'):
            # Kept apart from the session's own credentials (get_session puts
            # the role's there): the role is always assumed with the chain's.
            self.base_credentials = _require_default_chain(botocore_session)
            frozen = self.base_credentials.get_frozen_credentials()
            base = ('chain', frozen.access_key, _keyed_digest(frozen.secret_key))
            self._seal_keys = _seal_keys(frozen.secret_key)
            # Credentials of a session (instance role, container, SSO ...):
            # assuming a role with them is role chaining, capped at 1 h by AWS.
            self.chained = bool(frozen.token)
        else:
            base = ('keys', account['ak_id'], _keyed_digest(account['ak_secret']))
            self._seal_keys = _seal_keys(account['ak_secret'])
            self.chained = False
        self.binding = _Binding(base, self._seal_keys, self.base_credentials, self.chained)
        role = account.get('assume_role_arn')
        self.cache_key = SESSION_KEY_PREFIX + _hash(
            method, base, role, account.get('external_id'), self.session_name,
            account.get('serial_number'), account.get('duration_seconds'), self.partition)
        self.codes_key = (CODES_KEY_PREFIX + _hash(base, account['serial_number'])
                          if 'serial_number' in account else None)
        self.duration_key = DURATION_KEY_PREFIX + _hash(role) if role else None
        self.watch = None           # a Cancellation's watch(), for STS clients
        self.from_cache = False     # whether the last fetch served a cached session
        self.refused = None         # why AWS refused the cached session, when it did
        self.probed = None          # the role duration reached by stepping down

    def __repr__(self):
        return f'<TemporaryCredentialFetcher method={self.method} region={self.region}>'

    @property
    def session_name(self):
        return self.account.get('role_session_name') or DEFAULT_ROLE_SESSION_NAME

    def margins(self, record):
        """(advisory, mandatory) refresh windows for a session, as botocore uses
        them: 15 and 10 minutes, scaled down for short sessions (a 900 s role
        session would otherwise be renewed on every request). An MFA session
        cannot be renewed unattended, so it is used to its last minutes."""
        if 'token_code' in self.account:
            return MFA_EXPIRY_MARGIN, MFA_EXPIRY_MARGIN / 2
        lifetime = _parse_time(record['expiry_time']) - _parse_time(record.get('issued', record['expiry_time']))
        if lifetime <= datetime.timedelta(0):
            lifetime = datetime.timedelta(hours=1)
        return min(EXPIRY_MARGIN, lifetime / 3), min(MANDATORY_MARGIN, lifetime / 6)

    def refreshable_credentials(self):
        record = self.fetch(full=True)
        # An Organization's member session is not shown to AWS: its identity
        # is known (member_identity), and one AWS refuses is dropped when its
        # regions are refused and the account collected again in the same run
        # (AwsCollector.collect): a check would be an STS call per account
        # and hour, where steady state makes none.
        if self.from_cache and self.method != 'member_role' and not self._checked_recently():
            record = self._check_cached(record)
        advisory, mandatory = self.margins(record)
        return RefreshableCredentials(
            record['access_key'], record['secret_key'], record['token'],
            _parse_time(record['expiry_time']), self.fetch, self.method,
            time_fetcher=self.clock, advisory_timeout=int(advisory.total_seconds()),
            mandatory_timeout=int(mandatory.total_seconds()))

    def fetch(self, full=False):
        """Credentials metadata for botocore: cached while fresh, else from STS."""
        cached = self._load()
        now = self.clock()
        if cached and _parse_time(cached['expiry_time']) - now > self.margins(cached)[0]:
            LOG.debug('[AWS auth] reusing the cached %s session (expires %s)',
                      self.method, cached['expiry_time'])
            self.from_cache = True
            self._warn_if_mfa_short(cached, now)
            return cached if full else _metadata(cached)
        self.from_cache = False
        if self.codes_key:
            adopted = self._adopt_earlier_layout(now)
            if adopted:
                return adopted if full else _metadata(adopted)
            self._refuse_used_code(cached, now)
            # Recorded before the code is sent: a crash after AWS accepted it
            # must not make the next run send the same code again.
            self._remember_code(None)
        creds = self._call_sts()
        record = {
            'access_key': creds['AccessKeyId'],
            'secret_key': creds['SecretAccessKey'],
            'token': creds['SessionToken'],
            'expiry_time': _format_time(creds['Expiration']),
            'issued': _format_time(now),
        }
        self._store(record)
        # Just issued: AWS needs no asking whether it takes it, for a while.
        self._mark_checked()
        if self.codes_key:
            self._remember_code(record['expiry_time'])
        role = self.account.get('assume_role_arn') if self.method == 'member_role' else None
        LOG.info('[AWS auth] obtained a new %s session%s, valid until %s', self.method,
                 f' for account {role.split(":")[4]}' if role else '', record['expiry_time'])
        self._warn_if_mfa_short(record, now)
        return record if full else _metadata(record)

    def _check_cached(self, record):
        """A cached session is shown to AWS (sts:GetCallerIdentity, which needs
        no permission) before any client uses it, at most once every
        VERIFY_INTERVAL: a session AWS refuses (revoked, expired early,
        damaged) is dropped and replaced once, instead of failing every region
        until its recorded expiry; between checks, runs make no STS call. The
        answer is kept as the session's identity, so describe_identity asks no
        more."""
        sts = self.bs.create_client(
            'sts', region_name=self.region, aws_access_key_id=record['access_key'],
            aws_secret_access_key=record['secret_key'], aws_session_token=record['token'])
        if self.watch:
            sts = self.watch(sts)
        try:
            ident = sts.get_caller_identity()
        except ClientError as e:
            line = describe_client_error(e, 'sts:GetCallerIdentity')
            if e.response.get('Error', {}).get('Code') not in REFUSED_SESSION_CODES:
                raise AuthError(line) from None
            LOG.warning('[AWS auth] AWS refused the cached %s session (%s): dropping it and '
                        'starting a new one', self.method, line)
            self.cache.delete(self.cache_key)
            self.refused = line
            try:
                return self.fetch(full=True)
            finally:
                self.refused = None
        except BotoCoreError as e:
            raise AuthError(f'sts:GetCallerIdentity in {self.region} failed: {e}') from None
        _remember_identity(self.cache, record['access_key'],
                           _identity_of(self.method, ident, self.partition),
                           _parse_time(record['expiry_time']) - self.clock())
        self._mark_checked()
        return record

    def forget(self):
        """Drop the kept session (AWS refused it during collection): the next
        run starts a new one instead of using it until its check is due."""
        for key in (self.cache_key, self.cache_key + VERIFIED_SUFFIX):
            try:
                self.cache.delete(key)
            except Exception as e:
                LOG.warning('[AWS auth] cannot drop the refused session: %s', type(e).__name__)

    def _checked_recently(self):
        """Whether AWS took this session within VERIFY_INTERVAL: the record
        holds when, so a planted or everlasting entry cannot switch the check
        off (an answer from the future counts as none)."""
        try:
            record = json.loads(self.cache.get(self.cache_key + VERIFIED_SUFFIX) or 'null')
            age = (self.clock() - _parse_time(record['checked'])).total_seconds()
        except (ValueError, TypeError, KeyError, AttributeError):
            return False
        except Exception as e:   # a broken cache costs a check, not the run
            LOG.warning('[AWS auth] cannot read the cache: %s', type(e).__name__)
            return False
        return 0 <= age < VERIFY_INTERVAL

    def _mark_checked(self):
        self.cache.set(self.cache_key + VERIFIED_SUFFIX,
                       json.dumps({'checked': _format_time(self.clock())}), expire=VERIFY_INTERVAL)

    # -- STS --------------------------------------------------------------------

    def _sts_client(self):
        if self.base_credentials is not None:
            frozen = self.base_credentials.get_frozen_credentials()
            client = self.bs.create_client(
                'sts', region_name=self.region, aws_access_key_id=frozen.access_key,
                aws_secret_access_key=frozen.secret_key, aws_session_token=frozen.token)
        else:
            client = self.bs.create_client(
                'sts', region_name=self.region, aws_access_key_id=self.account['ak_id'],
                aws_secret_access_key=self.account['ak_secret'])
        # The STS calls end with the run that makes them (its deadline, its end).
        return self.watch(client) if self.watch else client

    def _call_sts(self):
        acc = self.account
        sts = self._sts_client()
        kwargs = {}
        if 'serial_number' in acc:
            kwargs.update(SerialNumber=acc['serial_number'], TokenCode=acc['token_code'])
        action = 'sts:AssumeRole' if 'assume_role_arn' in acc else 'sts:GetSessionToken'
        try:
            if 'assume_role_arn' in acc:
                kwargs.update(RoleArn=acc['assume_role_arn'], RoleSessionName=self.session_name)
                if 'external_id' in acc:
                    kwargs['ExternalId'] = acc['external_id']
                return self._assume_role(sts, kwargs)
            kwargs['DurationSeconds'] = acc.get('duration_seconds', SESSION_TOKEN_DEFAULT_DURATION)
            return sts.get_session_token(**kwargs)['Credentials']
        except ClientError as e:
            line = describe_client_error(e, action)
            if e.response.get('Error', {}).get('Code') in UNSIGNED_CODES:
                # AWS refused the keys themselves (a wrong ak_secret, a revoked
                # key): it judged no MFA code, so the code is still unused.
                self._forget_code()
                raise AuthError(line + "; check account['ak_id'] and account['ak_secret']",
                                e.response['Error']['Code']) from None
            raise AuthError(self._explain(line), e.response.get('Error', {}).get('Code')) from None
        except (EndpointConnectionError, ConnectTimeoutError) as e:
            # The request never reached AWS, so the MFA code was not consumed.
            self._forget_code()
            raise AuthError(f'{action} in {self.region}: cannot reach STS: {e}') from None
        except BotoCoreError as e:
            raise AuthError(f'{action} in {self.region} failed: {e}') from None

    def _assume_role(self, sts, kwargs):
        """AssumeRole for account['duration_seconds'], else for the longest
        session the role allows. AWS does not say how long that is (the role's
        MaxSessionDuration, 1-12 h; 1 h for role chaining), only that a request
        is too long: step down on that answer and remember, per role, where it
        stopped, so later sessions ask for it directly.

        With MFA the step down re-sends the code. AWS answers a too-long
        request with ValidationError (HTTP 400), a check of the request's
        parameters against the role, and issues nothing; we expect the code
        not to be spent then, but AWS does not document the order of its
        checks and the emulator checks no codes. So: a code that started a
        session is never sent again, and should AWS refuse the code on the
        shorter request ("MultiFactorAuthentication failed"), the run fails
        saying a fresh code is needed and the role is asked for 1 h (which
        every role allows) from then on, without probing: at most one code is
        lost to this, once per role."""
        if 'duration_seconds' in self.account:
            return sts.assume_role(DurationSeconds=self.account['duration_seconds'], **kwargs)['Credentials']
        duration = self._remembered_duration()
        while True:
            try:
                return sts.assume_role(DurationSeconds=duration, **kwargs)['Credentials']
            except ClientError as e:
                shorter, limit = _shorter_duration(e, duration)
                if shorter is None:
                    if self.probed and 'token_code' in self.account and _code_refused(e):
                        self.probed = ROLE_DURATION_STEPS[-1]
                        self._remember_duration(self.probed, MFA_PINNED_DURATION_TTL)
                    raise
                LOG.info('[AWS auth] %s: a %d s session exceeds %s; asking for %d s%s',
                         self.account['assume_role_arn'], duration, limit, shorter,
                         ' with the same MFA code (AWS refused the duration, not the code)'
                         if 'token_code' in self.account else '')
                self.probed = duration = shorter
                self._remember_duration(shorter, ROLE_DURATION_TTL)

    def _remember_duration(self, duration, ttl):
        if not self.chained:
            self.cache.set(self.duration_key, json.dumps({'duration_seconds': duration}), expire=ttl)

    def _remembered_duration(self):
        if self.chained:
            return CHAINED_ROLE_DURATION
        record = _read_record(self.cache, self.duration_key, _valid_duration, 'role duration')
        return record['duration_seconds'] if record else ROLE_DURATION_STEPS[0]

    def _explain(self, line):
        if 'token_code' in self.account:
            line += (f"; the MFA code for {self.account['serial_number']} has now been used: "
                     "put a fresh code in account['token_code'] before the next run")
            if self.probed:
                line += (f'; the next run asks the role for {self.probed} s at once (set '
                         "account['duration_seconds'] for another length)")
        if self.method == 'member_role':
            if 'AccessDenied' in line:
                line += (f"; does the role exist in account {self.account['assume_role_arn'].split(':')[4]} "
                         'and trust this caller' + (
                             ", with account['member_external_id'] as its ExternalId?"
                             if 'external_id' in self.account else
                             "? If its trust policy requires an ExternalId, set account['member_external_id']"))
        elif 'ExternalId' in line or ('AccessDenied' in line and 'external_id' in self.account):
            line += "; check account['external_id'] against the role's trust policy"
        return line

    # -- MFA codes ----------------------------------------------------------------

    def _refuse_used_code(self, cached, now):
        """AWS accepts each code once: never send a code we already sent."""
        entry = self._used_code_entry()
        if entry is None:
            return
        device = self.account['serial_number']
        fix = "Put a fresh code from the device in account['token_code'] and run again"
        expiry = entry['expiry_time']
        if self.refused:
            raise AuthError(
                f'AWS refused the cached MFA session for device {device} ({self.refused}) and '
                "account['token_code'] holds the code that was already used to start it; AWS "
                f'accepts each code only once. {fix}')
        if expiry is None:
            raise AuthError(
                f'an earlier run already sent the code in account[\'token_code\'] for device {device} '
                f'and got no session back; AWS accepts each code only once. {fix}')
        if cached or _parse_time(expiry) - now <= MFA_EXPIRY_MARGIN:
            raise AuthError(
                f"the MFA session for device {device} expired at {expiry} "
                f"(now {_format_time(now)}) and account['token_code'] holds the code that "
                f'was already used to start it; AWS accepts each code only once. {fix}'
                + ('' if 'duration_seconds' in self.account else
                   ", and consider account['duration_seconds'] for a longer session"))
        raise AuthError(
            f"account['token_code'] holds the code already used for device {device} to start a "
            f'session with other settings (duration_seconds, role or session name), valid until '
            f'{expiry}; AWS accepts each code only once. {fix}')

    def _warn_if_mfa_short(self, record, now):
        if 'token_code' not in self.account:
            return
        left = _parse_time(record['expiry_time']) - now
        if left < MFA_WARN_LEFT:
            LOG.warning('[AWS auth] the MFA session for device %s expires at %s (in %d min); after that '
                        "a fresh code is needed in account['token_code']",
                        self.account['serial_number'], record['expiry_time'],
                        max(0, int(left.total_seconds() // 60)))

    def _used_code_entry(self):
        digest = self._code_digest()
        for entry in self._used_codes():
            if entry['code'] == digest:
                return entry
        return None

    def _used_codes(self):
        record = _read_record(self.cache, self.codes_key, _valid_codes, 'used MFA codes')
        return record['codes'] if record else []

    def _remember_code(self, expiry_time):
        digest = self._code_digest()
        codes = [e for e in self._used_codes() if e['code'] != digest]
        codes.append({'code': digest, 'expiry_time': expiry_time})
        self.cache.set(self.codes_key, json.dumps({'codes': codes[-USED_CODES_KEPT:]}),
                       expire=USED_CODE_TTL)

    def _forget_code(self):
        if self.codes_key:
            digest = self._code_digest()
            codes = [e for e in self._used_codes() if e['code'] != digest]
            self.cache.set(self.codes_key, json.dumps({'codes': codes}), expire=USED_CODE_TTL)

    def _code_digest(self):
        # Keyed with the long-term secret: whoever can read the cache cannot
        # test guesses of the code without also holding ak_secret.
        msg = f"{self.account['serial_number']}|{self.account['token_code']}".encode()
        return hmac.new(self.account['ak_secret'].encode(), msg, hashlib.sha256).hexdigest()

    def _adopt_earlier_layout(self, now):
        """Before sessions were bound to the base credentials, an MFA session
        and its code were filed under a key of the account's settings alone.
        Its `used_code` is an HMAC keyed with ak_secret: when it matches, the
        caller holds the same secret and code, so the session may be adopted;
        an expired one still marks the code as used. Either way the entry is
        then removed: it held the session in the clear (for 30 days), and
        what it said now lives in the sealed session and the codes record."""
        acc = self.account
        old_key = 'integration_aws_auth:' + _hash(
            self.method, acc.get('ak_id'), acc.get('assume_role_arn'), acc.get('external_id'),
            self.session_name, acc.get('serial_number'), acc.get('duration_seconds'), self.partition)
        old = _read_json(self.cache, old_key)
        if not isinstance(old, dict) or old.get('used_code') != self._code_digest():
            return None
        session = {k: old[k] for k in SESSION_FIELDS if k in old}
        if not _valid_session(session):
            self._remember_code(None)
            self.cache.delete(old_key)
            return None
        self._remember_code(session['expiry_time'])
        self.cache.delete(old_key)
        if _parse_time(session['expiry_time']) - now <= self.margins(session)[0]:
            return None
        self._store(session)
        self.from_cache = True
        return session

    # -- the session record -------------------------------------------------------

    def _load(self):
        """The cached session, opened with the base secret's keys. A plain
        entry (written before sessions were sealed) is read once and sealed in
        place: an upgrade costs no running session, and no MFA code."""
        value, sealed = _read_sealed(self.cache, self.cache_key, self._seal_keys,
                                     'temporary credentials')
        record = _checked_record(self.cache, self.cache_key, value, _valid_session,
                                 'temporary credentials')
        if record is not None and not sealed:
            self._store(record)
        return record

    def _store(self, record):
        expire = max(60, int((_parse_time(record['expiry_time']) - self.clock()).total_seconds()))
        self.cache.set(self.cache_key, _seal(self._seal_keys, json.dumps(record)), expire=expire)


def note_refusal(result, error):
    """A region's ClientError: whether AWS refused the session itself
    (result['refused']) or denied the action (result['denied']), for
    CollectorAccount.forget_refused."""
    code = error.response.get('Error', {}).get('Code')
    if code in REFUSED_AT_USE_CODES:
        result['refused'] = code
    elif code in DENIED_CODES:
        result['denied'] = code


def _account_states(response):
    """{account id: State} of a ListAccounts answer (JSON). AWS retired the
    accounts' Status on 2026-09-09 for State (PENDING_ACTIVATION, ACTIVE,
    SUSPENDED, PENDING_CLOSURE, CLOSED): without it a closed account, which
    stays listed for 90 days, would count as ACTIVE."""
    try:
        accounts = json.loads(response.get('body') or b'{}').get('Accounts')
        return {a['Id']: a['State'] for a in accounts
                if isinstance(a.get('Id'), str) and isinstance(a.get('State'), str)}
    except (ValueError, TypeError, AttributeError):
        return {}       # not an answer of accounts (an error): botocore's to read


def _code_refused(error):
    """AWS's answer to an MFA code it does not accept (wrong, expired or used)."""
    err = error.response.get('Error', {})
    return err.get('Code') == 'AccessDenied' and 'MultiFactorAuthentication' in (err.get('Message') or '')


def _shorter_duration(error, duration):
    """(the next duration to ask for, the limit AWS named) after AWS found
    `duration` too long; (None, None) for any other error. AWS's texts:
    "The requested DurationSeconds exceeds the MaxSessionDuration set for this
    role." and "... exceeds the 1 hour session limit for roles assumed by role
    chaining." (ValidationError, HTTP 400)."""
    err = error.response.get('Error', {})
    message = err.get('Message') or ''
    if err.get('Code') != 'ValidationError' or 'DurationSeconds' not in message:
        return None, None
    if 'chaining' in message:
        if duration > CHAINED_ROLE_DURATION:
            return CHAINED_ROLE_DURATION, 'the 1 h limit of role chaining'
        return None, None
    if 'MaxSessionDuration' not in message:
        return None, None
    return next((d for d in ROLE_DURATION_STEPS if d < duration), None), "the role's MaxSessionDuration"


def _metadata(record):
    return {k: record[k] for k in ('access_key', 'secret_key', 'token', 'expiry_time')}


# --------------------------------------------------------------------------
# The default chain (instance role) and its diagnosis
# --------------------------------------------------------------------------

def _require_default_chain(bs):
    """The default chain's credentials; when botocore's chain finds nothing,
    say why, and for EC2 say what to do."""
    failure = None
    try:
        creds = bs.get_credentials()
    except BotoCoreError as e:
        creds, failure = None, str(e)
    if creds is not None:
        LOG.debug('[AWS auth] credentials from the default chain: %s', creds.method)
        return creds
    raise AuthError(
        "no credentials: the account has no ak_id, so botocore's default chain was used "
        '(environment, profile, web identity, container, EC2 instance role) and '
        + (f'failed ({failure}); ' if failure else 'found nothing; ') + diagnose_imds(bs))


# A socket's timeout: socket.timeout, which is TimeoutError only from Python
# 3.10 (Func runs 3.8).
_TIMEOUTS = (TimeoutError, socket.timeout)


def diagnose_imds(bs):
    """Probe the instance metadata service the way botocore does and explain."""
    endpoint = (bs.get_config_variable('ec2_metadata_service_endpoint')
                or 'http://169.254.169.254').rstrip('/')
    timeout = float(bs.get_config_variable('metadata_service_timeout') or 1)
    req = urllib.request.Request(
        endpoint + '/latest/api/token', method='PUT',
        headers={'X-aws-ec2-metadata-token-ttl-seconds': '60'})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            token = resp.read().decode()
    except _TIMEOUTS:
        return _hop_limit_hint(endpoint, timeout)
    except urllib.error.URLError as e:
        if isinstance(e.reason, _TIMEOUTS):
            return _hop_limit_hint(endpoint, timeout)
        return (f'the instance metadata service at {endpoint} is not reachable ({e.reason}): '
                'this machine is not an EC2 instance, so give the account ak_id and ak_secret')
    except OSError as e:
        return f'the instance metadata service at {endpoint} failed ({e})'
    req = urllib.request.Request(endpoint + '/latest/meta-data/iam/security-credentials/',
                                 headers={'X-aws-ec2-metadata-token': token})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            roles = resp.read().decode().split()
    except (OSError, urllib.error.URLError):
        roles = []
    if not roles:
        return ('the instance has no IAM role attached: attach an instance profile with the '
                "collector's policy, or give the account ak_id and ak_secret")
    return f'the instance role {roles[0]} returned no usable credentials'


def _hop_limit_hint(endpoint, timeout):
    return (f'the IMDSv2 token request to {endpoint} timed out after {timeout:g} s. In a '
            "container on EC2 set the instance's metadata hop limit to 2 (aws ec2 "
            'modify-instance-metadata-options --http-put-response-hop-limit 2); '
            'off EC2, give the account ak_id and ak_secret')


# --------------------------------------------------------------------------
# One account as a collector uses it
# --------------------------------------------------------------------------

# In place of an account id: the accounts a listing cut short left out (members).
UNLISTED = '(not listed)'


class Member:
    """One account a collector covers: its session and identity, the tags its
    points carry (AccountId and AccountName for an Organization's members),
    or why it is not collected (`error`: a failure; `skipped`: by design)."""
    __slots__ = ('account_id', 'account_name', 'session', 'identity', 'tags', 'error', 'skipped')

    def __init__(self, account_id, account_name, session=None, identity=None, tags=None):
        self.account_id = account_id
        self.account_name = account_name
        self.session = session
        self.identity = identity
        self.tags = tags if tags is not None else {}
        self.error = None
        self.skipped = None

    def __repr__(self):
        return f'<Member {self.account_id}>'

    def describe(self):
        """The Runner's line about this account (no secret)."""
        out = {'account_id': self.account_id, 'account_name': self.account_name}
        if self.account_id == UNLISTED:
            out['unlisted'] = True
        if self.error:
            out['error'] = self.error
        elif self.skipped:
            out['skipped'] = self.skipped
        elif self.identity:
            out.update(arn=self.identity['arn'], method=self.identity['method'])
        return out


# A collector's retries unless collector_configs or the user's SDK settings
# (AWS_RETRY_MODE, AWS_MAX_ATTEMPTS, the config file) say otherwise: adaptive
# mode absorbs throttling (RequestLimitExceeded, Throttling) client-side.
RETRY_DEFAULTS = {'retry_mode': 'adaptive', 'max_attempts': 8}
RETRY_MODES = ('adaptive', 'standard')    # botocore's legacy mode: no throttling backoff


def client_config(configs, user_agent):
    """botocore Config for a collector's clients. Retries: collector_configs'
    retry_mode / max_attempts first, then the user's SDK settings (left for
    botocore to read), then RETRY_DEFAULTS. max_attempts counts attempts, the
    first included: botocore's total_max_attempts (its Config's own
    'max_attempts' counts retries)."""
    retries = {}
    bs = None
    for key, option in (('retry_mode', 'mode'), ('max_attempts', 'total_max_attempts')):
        if key in configs:
            retries[option] = configs[key]
            continue
        bs = bs or botocore.session.Session(include_builtin_handlers=False)
        if not sdk_setting_given(key, bs):
            retries[option] = RETRY_DEFAULTS[key]
    return Config(retries=retries, connect_timeout=10, read_timeout=60,
                  user_agent_extra=user_agent)


def check_retry_options(configs, where):
    """collector_configs' retry_mode and max_attempts, when given."""
    if 'max_attempts' in configs:
        core.check_int(configs, 'max_attempts', 1, 20, where)
    if 'retry_mode' in configs and configs['retry_mode'] not in RETRY_MODES:
        raise core.ConfigError(f"{where}['retry_mode'] must be 'adaptive' or 'standard' "
                               f"(got {configs['retry_mode']!r})")


class CollectorAccount:
    """What every AWS collector needs of its account: the checked dict, the
    partition of its regions, one session for all of them (it loads the
    service models once and its clients are thread-safe), the regions to
    collect (['*'] resolved through ec2:DescribeRegions), and the identity
    call, started early in a thread of its own so that it overlaps the first
    requests."""

    def __init__(self, account, regions, cache=None, clock=None, label='AWS', operations=None,
                 text_timestamps=False):
        self.account = validate_account(account)
        # The operations the collector calls, resolve_regions' own added: the
        # clients of its sessions are then much cheaper to make (_LimitedLoader).
        self.operations = None
        if operations:
            self.operations = {service: list(names) for service, names in operations.items()}
            self.operations.setdefault('ec2', []).append('DescribeRegions')
        self.text_timestamps = text_timestamps
        self.regions = regions
        self.cache = cache
        self.clock = clock
        self.label = label
        self.partition = None
        if regions != ['*']:
            self.partition = check_partition(regions, "collector_configs['regions']")
            check_role_partition(self.account, self.partition)
        self._session = None
        self._identity = None
        self._pending_identity = None
        self._identity_cancellation = None      # the run start_identity was asked by
        self._management_id = None  # the Organization's management account, once asked
        self.clients = []           # of take_client, for keep_clients at the run's end
        self._identity_lock = threading.Lock()
        self.fresh = None           # the Runner's skip rule (use_freshness)
        self._watch = None          # the run's Cancellation's watch(), for its STS clients
        self.collected = []         # the Members of the last members() call
        self.only = None            # account ids a second round is limited to

    def session(self):
        """The account's own session (get_session), made at the first call:
        its STS calls (a role's AssumeRole, MFA's GetSessionToken, the hourly
        check of a kept session, ['*']'s partition) end with the run, at its
        deadline too (start_identity gives the run's watch first)."""
        if self._session is None:
            if self.partition is None:
                self.partition = self._discover_partition()
            home = self.regions[0] if self.regions != ['*'] else PARTITION_STS_REGION.get(
                self.partition, 'us-east-1')
            self._session = get_session(
                self.account, region=home, regions=None if self.regions == ['*'] else self.regions,
                cache=self.cache, clock=self.clock, operations=self.operations,
                text_timestamps=self.text_timestamps, watch=self._watch)
        return self._session

    def use_cancellation(self, cancellation):
        """The STS calls of this account's sessions (its own and its members')
        end with `cancellation`: the run's, or check's."""
        self._watch = cancellation.watch
        if self._session is not None and self._session.integration_watch:
            self._session.integration_watch(cancellation.watch)     # a collector run again

    def start_identity(self, cancellation, config=None):
        """Begin the identity call in the background (a no-op once known or
        under way; a run again after it failed asks again)."""
        self.use_cancellation(cancellation)
        pending = self._pending_identity
        if pending is not None and pending.done() and pending.exception() is not None:
            self._pending_identity = None
        if self._identity is None and self._pending_identity is None:
            session = self.session()
            sts = cancellation.watch(take_client(session, 'sts', session.region_name, config))

            self.clients.append(sts)     # kept with the run's own, when it ends well
            self._pending_identity = core.in_background(
                describe_identity, session, self.account, cache=self.cache, client=sts,
                keep_keys_for=self._keep_keys_for)
            self._identity_cancellation = cancellation

    def identity(self):
        """The account in use (method, account id, ARN, partition): one sts call,
        or the answer of the one start_identity began."""
        with self._identity_lock:     # the Runner and region threads may ask at once
            if self._identity is None:
                pending = self._pending_identity
                if pending is not None:
                    # Kept until it has answered (a wait cut short by Func's
                    # timeout leaves it to the next caller), and when it failed,
                    # for the rest of the run: every caller (the Runner, the
                    # accounts' listing) gets its error, none asks again.
                    # Stopped (the Runner's deadline) while botocore sleeps
                    # between throttled retries: not waited for.
                    stopped = self._identity_cancellation.outcome(pending, 'the identity call answered')
                    if stopped is not None and not pending.done():
                        raise stopped
                    self._identity = pending.result()
                    self._pending_identity = None
                else:
                    self._identity = describe_identity(
                        self.session(), self.account, cache=self.cache,
                        keep_keys_for=self._keep_keys_for)
            return self._identity

    @property
    def _keep_keys_for(self):
        return MANAGEMENT_KEYS_IDENTITY_TTL if self.organization else None

    def resolve_regions(self, config=None):
        """The configured regions, or for ['*'] every region enabled for the
        account in its partition. None for ['*'] over an Organization: each
        member's own (member_regions), as opt-in regions differ by account."""
        if self.regions != ['*']:
            return list(self.regions)
        if self.organization:
            return None
        regions = self._enabled_regions(self.session(), config)
        LOG.info("[%s] regions ['*'] in %s: %d enabled region(s)", self.label, self.partition,
                 len(regions))
        return regions

    def member_regions(self, member, regions, config=None):
        """`regions` (resolve_regions'), or when None the regions enabled in
        the member's account: its own ec2:DescribeRegions, kept for
        MEMBER_REGIONS_TTL (sealed like its session), so that a steady-state
        run asks nothing."""
        if regions is not None:
            return regions
        cache, binding = self._cache(), self.session().integration_binding
        key = MEMBER_REGIONS_KEY_PREFIX + _hash(binding.key, member.account_id, self.partition)
        what = "a member account's enabled regions"
        record, sealed = _read_sealed(cache, key, binding.seal_keys, what)
        record = _checked_record(cache, key, record if sealed else {}, lambda r: all(
            isinstance(n, str) and partition_of(n) == self.partition and REGION_RE.match(n)
            for n in r['regions']), what)
        if record is not None:
            return list(record['regions'])
        try:
            found = self._enabled_regions(member.session, config)
        except AuthError as e:
            forget = getattr(member.session, 'integration_forget', None)
            denied = e.code in DENIED_CODES and getattr(member.session, 'integration_worked', None)
            if not (e.code in REFUSED_AT_USE_CODES or denied) or forget is None:
                raise
            # A kept member session AWS refuses (revoked), or denies after it
            # read regions before (revoked by a deny): dropped, and the
            # account opened again once, as its regions' refusal would.
            (LOG.debug if denied else LOG.warning)(
                '[%s] AWS %s the kept session of account %s (%s): dropped; opening a new one',
                self.label, 'denied' if denied else 'refused', member.account_id, e.code)
            forget()
            member.session = self._member_session(member.account_id)
            found = self._enabled_regions(member.session, config)
        LOG.debug("[%s] regions ['*'] of account %s: %d enabled region(s)", self.label,
                  member.account_id, len(found))
        try:
            cache.set(key, _seal(binding.seal_keys, json.dumps({'regions': found})),
                      expire=MEMBER_REGIONS_TTL)
        except Exception as e:      # a broken cache costs this call again next run
            LOG.warning("[AWS auth] cannot keep a member account's regions: %s", type(e).__name__)
        return found

    def _enabled_regions(self, session, config):
        client = session.client('ec2', region_name=session.region_name, config=config)
        if self._watch is not None:         # a member's, on an opener's thread: ends with the run
            client = self._watch(client)
        try:
            resp = client.describe_regions(AllRegions=False)
        except (ClientError, BotoCoreError) as e:
            line = (describe_client_error(e, 'ec2:DescribeRegions') if isinstance(e, ClientError)
                    else f'ec2:DescribeRegions: {core.first_line(e)}')
            code = e.response.get('Error', {}).get('Code') if isinstance(e, ClientError) else None
            raise AuthError(f"regions ['*']: {line}", code) from None
        # Real AWS lists only the partition's regions; emulators may list all.
        return sorted(r['RegionName'] for r in resp['Regions']
                      if r.get('OptInStatus') != 'not-opted-in'
                      and partition_of(r['RegionName']) == self.partition)

    # -- the accounts to collect -------------------------------------------

    @property
    def organization(self):
        """Whether this account collects the member accounts of an Organization."""
        return 'member_role_name' in self.account

    def use_freshness(self, fresh):
        """The Runner's skip rule: for one account, why to skip this run (or
        None); an Organization applies it to each member in members()."""
        self.fresh = fresh
        return None if self.organization else fresh.skip_reason()

    def accounts(self):
        """An Organization's member accounts, described for the Runner's lines."""
        return [m.describe() for m in self.collected] if self.organization else []

    def collected_accounts(self, results):
        """The accounts collected in full, given the collector's region results:
        the Runner records them as fresh ('' is the one account)."""
        failed = {r.get('account') for r in results if r['error']}
        if not self.organization:
            return [] if failed else ['']
        return [m.account_id for m in self.collected if m.session and m.account_id not in failed]

    def forget_refused(self, results, again=True):
        """A kept session AWS refused on every region it was used in (expired
        or revoked early: ExpiredToken, InvalidClientTokenId, AuthFailure ...)
        is dropped; the collector then collects those accounts once more with
        a new one (AwsCollector.collect). One region's refusal is not enough:
        an opt-in region not enabled also answers AuthFailure. So is a session
        that read a region in an earlier run and is now denied in every region,
        that one included (IAM's "Revoke active sessions" denies the sessions
        issued before it; a role that never had the permission, or a region a
        service control policy denies, has no region read). Returns the
        Members whose session was dropped."""
        dropped = []
        for member, mine in self.results_by_member(results):
            forget = getattr(member.session, 'integration_forget', None)
            why = [r.get('refused') or r.get('denied') for r in mine]
            # Denied: news only in a region where this session read before.
            # Refused: unless a session new in the last run's second round
            # was refused so too (an opt-in region not enabled answers
            # AuthFailure, to every session, every run).
            worked = getattr(member.session, 'integration_worked', ())
            news = any(r['region'] in worked for r in mine) or (
                all(r.get('refused') for r in mine)
                and not getattr(member.session, 'integration_refused_new', False))
            if forget and mine and all(why) and news:
                refused = mine[0].get('refused')
                # A denial is also a role whose permission was taken away: if
                # the new session is denied too, its FAILED line is the one.
                (LOG.warning if refused else LOG.debug)(
                    '[%s] AWS %s the kept session%s in every region (%s)%s: dropped; %s',
                    self.label, 'refused' if refused else 'denied',
                    f' of account {member.account_id}' if member.account_id else '', why[0],
                    '' if refused else ', where it worked before (revoked?)',
                    'collecting once more with a new one' if again else
                    'the next run opens a new one (the run is past its deadline)')
                forget()
                dropped.append(member)
        if dropped and not self.organization:
            self._session = None        # the next session() starts a new one
        return dropped

    def results_by_member(self, results):
        """(Member, its region results) for each account collected."""
        by_account = {}
        for result in results:
            by_account.setdefault(result.get('account'), []).append(result)
        return [(member, by_account.get(member.account_id if self.organization else None, []))
                for member in self.collected]

    def members(self, cancellation, pool, fresh=None, ready=None, recheck=False, bound=None):
        """The accounts to collect, each a Member with a session or the one line
        saying why not. Without member_role_name: the account itself. With it:
        every account of account['member_accounts'], or else every ACTIVE
        account organizations:ListAccounts returns, less account['exclude_accounts'];
        each member's role is assumed on `pool` as soon as its page of the
        listing arrives, and `ready(member)` (on the pool) may start on it at
        once. `fresh` (the Runner's skip rule) leaves out the accounts
        collected too recently. The management account, which is collected
        only when the role exists there, is skipped without asking STS while
        an earlier run's refusal is under MANAGEMENT_ROLE_RECHECK old, unless
        `recheck` (check's rows ask AWS). `bound`: a semaphore of the
        collector's requests in flight, which each opening holds while it
        assumes the member's role."""
        if not self.organization:
            self.collected = [Member(None, None, self.session())]
            return self.collected
        # The member roles' STS calls stop with the run, like every other call.
        self.use_cancellation(cancellation)
        listed = self.account.get('member_accounts')
        excluded = set(self.account.get('exclude_accounts', ()))
        out, opening = [], []
        refused = {}        # the management account's refusal, from an earlier run
        skipped_as_refused = []
        organization_ids = set()

        def take(page):
            for account_id, name, status in page:
                organization_ids.add(account_id)
                if account_id in excluded or (self.only is not None and account_id not in self.only):
                    continue
                member = Member(account_id, name, tags={'AccountId': account_id})
                if name:
                    member.tags['AccountName'] = name
                recent = fresh.skip_reason(account_id) if fresh is not None else None
                if status != 'ACTIVE':
                    member.skipped = f'the account is {status}'
                elif recent:
                    member.skipped = recent
                elif account_id == refused.get('account_id'):
                    member.skipped = refused['skipped']
                    skipped_as_refused.append(member)
                else:
                    opening.append((member, pool.run(self._open_member, member, ready, cancellation, bound)))
                out.append(member)

        try:
            # The identity call (start_identity) is under way meanwhile: the
            # accounts are listed without waiting for it.
            if listed:
                take([(a, None, 'ACTIVE') for a in listed])
            else:
                refused.update(({} if recheck else self._known_refusal()) or {})
                self._list_accounts(cancellation, take)
        except (AuthError, core.Cancelled) as e:
            code = getattr(e, 'code', None)
            if code in UNSIGNED_CODES:
                self._forget_identity()     # keys revoked: the next run's identity call says so
            if not out or not (cancellation.reason or code in THROTTLING_CODES):
                self.identity()     # keys AWS refuses: the identity call's line says so
                raise
            # The listing failed part-way (throttled past botocore's retries,
            # or cut short by the Runner's deadline): the accounts listed so
            # far are collected, and the others are one failure. (A refusal,
            # AccessDenied say, is the account's failure, at once.)
            rest = Member(UNLISTED, None)
            rest.error = (f"the Organization's accounts after the {len(out)} listed: "
                          + (f'organizations:ListAccounts {cancellation.reason}' if cancellation.reason
                             else str(e) if isinstance(e, AuthError) else core.first_line(e)))
            out.append(rest)
        if self.only is None and not any(m.account_id == UNLISTED for m in out):
            # (Not from a listing cut short: an id on a page never read is no typo.)
            self._say_what_selects_nothing(excluded - organization_ids, out, listed)
        self.identity()     # the keys' own failure first

        def is_management(account_id):
            return not listed and account_id == self._management_account_id(cancellation)

        for member in skipped_as_refused:
            if not is_management(member.account_id):
                # Only the management account's refusal is kept: a record
                # naming another account counts as absent.
                LOG.warning("[AWS auth] ignoring a kept refusal of the member role that names "
                            "account %s, not the management account: it counts as absent",
                            member.account_id)
                self._forget_refusal()
                member.skipped = None
                opening.append((member, pool.run(self._open_member, member, ready, cancellation, bound)))
        outcomes = [(member, cancellation.outcome(opened, 'this account was opened'))
                    for member, opened in opening]
        refused = next((e for _, e in outcomes if getattr(e, 'code', None) in UNSIGNED_CODES), None)
        if refused is not None:
            # STS refuses the credentials that assume the roles (keys revoked
            # since their identity was kept): the account's one line, not one
            # per member, and their identity is asked again next run.
            self._forget_identity()
            forget = getattr(self.session(), 'integration_forget', None)
            if forget is not None:
                forget()            # a kept session of the management side: a new one next run
            raise refused
        for member, outcome in outcomes:
            if outcome is None:
                if recheck and is_management(member.account_id):
                    self._forget_refusal()      # check found the role there: runs ask again now
                continue
            line = str(outcome) if isinstance(outcome, AuthError) else core.first_line(outcome)
            # A session made, the failure came after the role (its regions' lookup).
            opened, member.session = member.session is not None, None   # never marked fresh, nor kept
            if cancellation.reason is not None and (isinstance(outcome, core.Cancelled)
                                                    or getattr(outcome, 'code', None) is None):
                member.error = cancellation.reason      # cut short by the Runner's deadline
            elif not opened and is_management(member.account_id):
                # The management account is included only when the role exists there.
                member.skipped = f"the management account: its role {self.account['member_role_name']!r} cannot be assumed ({line})"
                if getattr(outcome, 'code', None) == 'AccessDenied':
                    self._remember_refusal(member)
            else:
                member.error = line
        out.sort(key=lambda m: m.account_id)
        self.collected = out
        return out

    def _say_what_selects_nothing(self, unknown, selected, listed):
        """A line for an exclusion that excludes nothing (a typo's id would
        quietly leave its account collected), and one for a run left with no
        account at all."""
        source = ("account['member_accounts']" if listed else
                  'the Organization (organizations:ListAccounts)')
        if unknown:
            LOG.warning("[%s] account['exclude_accounts'] names %s, not an account of %s: check "
                        'the id(s)', self.label, ', '.join(sorted(unknown)), source)
        if not selected:
            LOG.warning("[%s] no account to collect: %s has none that account['exclude_accounts'] "
                        'leaves', self.label, source)

    def _management_account_id(self, cancellation):
        """The Organization's management account, asked only when a member
        role is refused there: organizations:DescribeOrganization, which any
        account of an Organization may call (the credentials in use may be a
        delegated administrator's, in a member account), kept for
        MANAGEMENT_ID_TTL, sealed like the sessions. Where it cannot be asked
        (no permission): the account of the credentials in use."""
        if self._management_id is not None:
            return self._management_id
        cache, binding = self._cache(), self.session().integration_binding
        key = MANAGEMENT_ID_KEY_PREFIX + _hash(binding.key, self.partition)
        what = "the Organization's management account"
        record, sealed = _read_sealed(cache, key, binding.seal_keys, what)
        record = _checked_record(cache, key, record if sealed else {},
                                 lambda r: bool(ACCOUNT_ID_RE.match(r['account_id'])), what)
        if record is not None:
            self._management_id = record['account_id']
            return self._management_id
        session = self.session()
        client = cancellation.watch(session.client('organizations', region_name=session.region_name))
        try:
            answer = client.describe_organization()['Organization']['MasterAccountId']
            ttl = MANAGEMENT_ID_TTL
        except (ClientError, BotoCoreError, KeyError, TypeError) as e:
            LOG.debug('[%s] organizations:DescribeOrganization: %s; the management account is '
                      'taken to be the one of the credentials in use', self.label, core.first_line(e))
            answer = None
        except core.Cancelled:
            # The run's deadline passed: the old rule for this run, nothing kept.
            return self.identity()['account_id']
        if not isinstance(answer, str) or not ACCOUNT_ID_RE.match(answer):
            # Asked again within the hour, as the management account's refusal.
            answer, ttl = self.identity()['account_id'], MANAGEMENT_ROLE_RECHECK
        self._management_id = answer
        try:
            cache.set(key, _seal(binding.seal_keys, json.dumps({'account_id': answer})), expire=ttl)
        except Exception as e:      # a broken cache costs this call again next time
            LOG.warning("[AWS auth] cannot keep the Organization's management account: %s", type(e).__name__)
        return answer

    def _refusal_key(self):
        """Bound to the management keys (as its sessions are: no secret in
        it), the role and how it is asked for."""
        return MANAGEMENT_ROLE_KEY_PREFIX + _hash(
            self.session().integration_binding.key, self.account['member_role_name'],
            self.account.get('member_external_id'), self.account.get('role_session_name'),
            self.partition)

    def _known_refusal(self):
        """{account_id, skipped} of the management account whose role an
        earlier run found refused (AccessDenied), while that is under
        MANAGEMENT_ROLE_RECHECK old; else None. The record is sealed like the
        sessions (the cache is shared: a record only the management keys
        could make), and members() still checks it names the management
        account once that is known."""
        cache = self._cache()
        key, what = self._refusal_key(), "the management account's refusal of the member role"
        record, sealed = _read_sealed(cache, key, self.session().integration_binding.seal_keys, what)
        record = _checked_record(cache, key, record if sealed else {}, lambda r: (
            ACCOUNT_ID_RE.match(r['account_id']) and isinstance(r['skipped'], str)
            and '\n' not in r['skipped'] and _is_time(r['checked'])), what)
        if record is None:
            return None
        checked = _parse_time(record['checked'])
        if not 0 <= (self._now() - checked).total_seconds() < MANAGEMENT_ROLE_RECHECK:
            return None
        again = _format_time(checked + datetime.timedelta(seconds=MANAGEMENT_ROLE_RECHECK))
        return {'account_id': record['account_id'],
                'skipped': f"{record['skipped']}; asked again after {again}"}

    def _remember_refusal(self, member):
        record = json.dumps({'account_id': member.account_id, 'skipped': member.skipped,
                             'checked': _format_time(self._now())})
        try:
            self._cache().set(self._refusal_key(), _seal(self.session().integration_binding.seal_keys, record),
                      expire=MANAGEMENT_ROLE_RECHECK)
        except Exception as e:      # a broken cache costs an AssumeRole next run, not this run
            LOG.warning('[AWS auth] cannot keep the management account\'s refusal: %s', type(e).__name__)

    def _forget_refusal(self):
        try:
            self._cache().delete(self._refusal_key())
        except Exception as e:
            LOG.warning('[AWS auth] cannot drop the kept refusal: %s', type(e).__name__)

    def _cache(self):
        return self.cache if self.cache is not None else _default_cache()

    def _now(self):
        return (self.clock or _utcnow)()

    def _open_member(self, member, ready=None, cancellation=None, bound=None):
        with (core.held(bound, cancellation, 'this account was opened') if bound is not None
              else contextlib.nullcontext()):
            session = self._member_session(member.account_id)
        member.identity = member_identity(self.account, member.account_id, self.partition)
        member.session = session
        if ready is not None:
            ready(member)
        return member

    def _forget_identity(self):
        """Drop the kept identity of the management keys (describe_identity)."""
        frozen = self.session().get_credentials().get_frozen_credentials()
        try:
            self._cache().delete(_identity_key(frozen))
        except Exception as e:      # a broken cache: the identity stays until it expires
            LOG.warning('[AWS auth] cannot drop the kept identity: %s', type(e).__name__)

    def _member_session(self, account_id):
        return member_session(self.session(), self.account, account_id, cache=self.cache,
                              clock=self.clock, watch=self._watch, operations=self.operations,
                              text_timestamps=self.text_timestamps)

    def _list_accounts(self, cancellation, take):
        """take([(id, name, state)]) for each page of the Organization's accounts."""
        session = self.session()
        client = cancellation.watch(session.client('organizations', region_name=session.region_name))
        # An account's State as AWS sent it, read from the answer itself: the
        # botocore of Func (1.37) has no State in its model, and drops it.
        states = {}
        client.meta.events.register('before-parse.organizations.ListAccounts',
                                    lambda response_dict, **_: states.update(_account_states(response_dict)))
        try:
            for page in client.get_paginator('list_accounts').paginate():
                take([(a['Id'], a.get('Name'), a.get('State') or states.get(a['Id']) or a.get('Status')
                       or 'ACTIVE') for a in page['Accounts']])
        except ClientError as e:
            raise AuthError(describe_client_error(e, 'organizations:ListAccounts') + (
                ': list the accounts in account[\'member_accounts\'], or use the management '
                'account (or a delegated administrator)' if 'AccessDenied' in str(e) else ''),
                e.response.get('Error', {}).get('Code')) from None
        except BotoCoreError as e:
            raise AuthError(f'organizations:ListAccounts failed: {core.first_line(e)}') from None

    def _discover_partition(self):
        """['*'] names no region: the role's or MFA device's ARN tells the
        partition, or else the keys do (they work in their own partition only)."""
        arn = self.account.get('assume_role_arn')
        if arn:
            return ROLE_ARN_RE.match(arn).group(1)
        device = _device_partition(self.account)
        if device:
            return device       # an MFA device works in its own partition only
        errors = []
        for partition, region in PARTITION_STS_REGION.items():
            try:
                session = get_session(self.account, region=region, cache=self.cache, clock=self.clock,
                                      watch=self._watch)
                sts = session.client('sts', region_name=region)
                self._identity = describe_identity(
                    session, self.account, cache=self.cache,
                    client=self._watch(sts) if self._watch else sts, keep_keys_for=self._keep_keys_for)
                return self._identity['partition']
            except AuthError as e:
                errors.append(f'{partition}: {e}')
                if 'InvalidClientTokenId' not in str(e) and 'AuthFailure' not in str(e):
                    break
        raise AuthError("regions ['*']: the credentials work in no partition: " + '; '.join(errors))


class AwsCollector:
    """What every AWS collector shares: the account (CollectorAccount), its
    extra_tags checked against the tags the collector sets itself, the
    user's filters and after_collect, its state key, and what the Runner asks
    about accounts. A subclass sets `name` (its state key's prefix and user
    agent), `title`, `category`, `built_in_tags` and `validate_configs`."""

    name = 'aws'
    built_in_tags = ()
    # {service: [operations]} the collector calls: its clients then know only
    # those (much cheaper to make); None, all.
    operations = None
    # True: EC2's timestamps come as iso_time's text (FastParserFactory).
    text_timestamps = False
    account_tags = ('AccountId', 'AccountName')     # an Organization's member accounts

    def __init__(self, account, configs, filters, after_collect, cache=None, clock=None):
        with core.said_in_task_log(self.title):
            self._configure(account, configs, filters, after_collect, cache, clock)

    def _configure(self, account, configs, filters, after_collect, cache, clock):
        validate_account(account)           # the account's mistakes are reported first
        self.configs = self.validate_configs(configs)
        self.aws = CollectorAccount(account, self.configs['regions'], cache=cache, clock=clock,
                                    label=self.title, operations=self.operations,
                                    text_timestamps=self.text_timestamps)
        self.account = self.aws.account
        self.regions = self.configs['regions']
        self.extra_tags = self.account.get('extra_tags', {})
        for key in self.extra_tags:
            if key in self.own_tags():
                raise AccountConfigError(
                    f"account['extra_tags'][{key!r}] would overwrite the tag the {self.title} "
                    'collector sets itself: rename the key')
        self.filters = core.check_filters(filters)
        if after_collect is not None and not callable(after_collect):
            raise core.ConfigError(
                f'after_collect must be a function taking a point and returning it (or None), '
                f'not {type(after_collect).__name__}')
        self.after_collect = after_collect
        self.results = []
        self._cancellation = None       # the current run's (new_cancellation)
        self._expired = None            # the Runner's deadline passed: why (expire)

    def __repr__(self):
        return f'<DataCollector {self.name} method={auth_method(self.account)} regions={self.regions}>'

    @property
    def several_accounts(self):
        """An Organization's: the Runner's lines are per account."""
        return self.aws.organization

    def own_tags(self):
        """The tags the collector sets itself, which extra_tags may not name
        (they would be lost, or overwrite the collector's)."""
        return self.built_in_tags + (self.account_tags if self.aws.organization else ())

    @property
    def state_key(self):
        """Which collection this is: everything that changes its output
        (never a secret)."""
        return self._fingerprint(SECRET_KEYS)

    @property
    def freshness_key(self):
        """The key of the Runner's "collected recently" records. An
        Organization's are per member account, so the keys that only select
        the accounts are left out: editing them must not collect again the
        accounts collected minutes ago."""
        return self._fingerprint(SECRET_KEYS + ACCOUNT_LIST_KEYS if self.aws.organization else SECRET_KEYS)

    def _fingerprint(self, left_out):
        who = {k: v for k, v in self.account.items() if k not in left_out}
        return f'{self.name}:' + core.fingerprint(who, self.configs, self.filters, self.after_collect)

    def identity(self):
        """The account in use (method, account id, ARN, partition): one sts call,
        already under way in the background when start() ran."""
        return self.aws.identity()

    def collect(self):
        """The subclass's _collect(); then, for an account whose kept session
        AWS refused in every region (revoked since its last check; a member
        session is never checked), or denied there after it worked in an
        earlier run (forget_refused), that session is dropped and the account
        collected once more with a new one (with MFA that needs a fresh code:
        the line says so); not after the Runner's deadline. A run that
        ended well keeps its member accounts' sessions for the next
        (keep_member_sessions)."""
        yield from self._collect()
        dropped = self.aws.forget_refused(self.results, again=self._expired is None)
        if dropped and self._expired is None:
            yield from self._collect_again(dropped)
        # The regions each session read: a later denial there is news.
        for member, mine in self.aws.results_by_member(self.results):
            if member.session is not None:
                read = {r['region'] for r in mine if not r['error']}
                member.session.integration_worked = getattr(member.session, 'integration_worked',
                                                            frozenset()) | read
        if self.aws.organization:
            keep_member_sessions(m.session for m in self.aws.collected if m.session is not None)

    def _collect_again(self, dropped):
        first, first_members = self.results, self.aws.collected
        again = {m.account_id for m in dropped}
        self.aws.only = {a for a in again if a is not None}
        try:
            yield from self._collect()
        finally:
            self.aws.only = None
        # A new session refused everywhere as the old one was: the account's
        # refusal (regions not enabled), not its session's; not asked again.
        for member, mine in self.aws.results_by_member(self.results):
            if member.session is not None and mine and all(r.get('refused') for r in mine):
                member.session.integration_refused_new = True
        self.results = [r for r in first if r.get('account') not in again] + self.results
        # Every account of the run, the second round's where it went again (the
        # skip rule marks them all).
        retried = {m.account_id: m for m in self.aws.collected}
        self.aws.collected = [retried.get(m.account_id, m) for m in first_members]

    def expire(self, reason):
        """The Runner's deadline (called from its timer's thread): the run's
        unfinished requests stop, and what did not finish fails saying
        `reason`; the points collected until then are delivered. None: a run
        begins, no deadline passed (the Runner, before start())."""
        self._expired = reason
        stop = self._cancellation
        if reason is not None and stop is not None:
            stop.cancel(reason)

    def new_cancellation(self):
        """The Cancellation of a run that starts (cancelled at once when the
        Runner's deadline has passed)."""
        stop = self._cancellation = core.Cancellation()
        if self._expired is not None:
            stop.cancel(self._expired)
        return stop

    def keep_clients(self, clients):
        """The run ended well: its clients (the identity call's too) are the
        next run's (keep_clients)."""
        clients, self.aws.clients = list(clients) + self.aws.clients, []
        keep_clients(clients)

    def use_freshness(self, fresh):
        return self.aws.use_freshness(fresh)

    def accounts(self):
        return self.aws.accounts()

    def collected_accounts(self):
        return self.aws.collected_accounts(self.results)

    def _client_config(self):
        return client_config(self.configs, f'integration_{self.name}')


def check_accounts(aws, config, service, probe, explain):
    """The rows of `integration-runner check` for a collector: for each
    account (an Organization's members, or the one account) and region,
    probe(client, region) -> the line when allowed, or explain(error, region)
    when not; an account whose role cannot be assumed is one row."""
    stop = core.Cancellation()
    aws.use_cancellation(stop)      # not the cancellation of a run before, ended
    pool = core.Workers(4, 'check')
    try:        # one cancellation for the whole check (the members' regions lookups too)
        return _check_rows(aws, config, service, probe, explain, stop, pool)
    finally:
        stop.cancel()
        pool.stop(core.STOP_GRACE)
        # The member sessions it took, given back with what runs learned of
        # them (the regions each read: see forget_refused).
        if aws.organization:
            keep_member_sessions(m.session for m in aws.collected if m.session is not None)


def _check_rows(aws, config, service, probe, explain, stop, pool):
    try:
        # The accounts' listing or the regions' lookup refused: its own row
        # (a check is where a user looks for that), not a traceback.
        what = 'accounts'
        members = aws.members(stop, pool, recheck=True)
        what = 'regions'
        regions = aws.resolve_regions(config)
    except AuthError as e:
        return [{'region': what, 'ok': False, 'reason': str(e)}]
    rows = []
    for member in members:
        prefix = f'{member.account_id} ' if aws.organization else ''
        if member.error or member.skipped:
            name = f'({member.account_name}) ' if member.account_name else ''
            rows.append({'region': member.account_id, 'ok': not member.error,
                         'skipped': not member.error,
                         'reason': name + (member.error or f'skipped: {member.skipped}')})
            continue
        try:
            mine = aws.member_regions(member, regions, config)
        except AuthError as e:
            rows.append({'region': prefix + "regions ['*']", 'ok': False, 'reason': str(e)})
            continue
        for region in mine:
            client = member.session.client(service, region_name=region, config=config)
            try:
                rows.append({'region': prefix + region, 'ok': True, 'reason': probe(client, region)})
            except (ClientError, BotoCoreError, AuthError) as e:
                rows.append({'region': prefix + region, 'ok': False, 'reason': explain(e, region)})
    return rows


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------

def _default_cache():
    """DFF.CACHE: Func injects DFF into every script it loads, this one too;
    otherwise the runner's (Func's, or the local runtime's files)."""
    dff = globals().get('DFF')
    return dff.CACHE if dff is not None else core.default_cache()


def _read_json(cache, key):
    try:
        raw = cache.get(key)
        return json.loads(raw) if raw else None
    except (ValueError, OSError, TypeError) as e:
        LOG.warning('[AWS auth] ignoring an unreadable cache entry: %s', type(e).__name__)
        return None


def _read_record(cache, key, valid, what):
    """The cache entry `key` when `valid(entry)`; an entry of another shape
    (another version's, damaged, planted) counts as absent: it is logged once
    (naming what it should have been, never its content) and removed."""
    return _checked_record(cache, key, _read_json(cache, key), valid, what)


def _read_sealed(cache, key, keys, what):
    """(JSON value, sealed) of the sealed cache entry `key`; (None, True)
    when absent. An entry that does not open with `keys` (sealed with another
    base secret, altered, cut short, or of another version) counts as absent:
    logged once, without its content, and removed. A plain entry is the layout
    before sealing: (its value, False), for the caller to seal."""
    try:
        raw = cache.get(key)
    except (OSError, TypeError) as e:
        LOG.warning('[AWS auth] ignoring an unreadable cache entry: %s', type(e).__name__)
        return None, True
    if not raw:
        return None, True
    if not raw.startswith(SEALED_PREFIX):
        try:
            return json.loads(raw), False
        except ValueError as e:
            LOG.warning('[AWS auth] ignoring an unreadable cache entry: %s', type(e).__name__)
            return None, True
    text = _unseal(keys, raw)
    if text is not None:
        try:
            return json.loads(text), True
        except ValueError:
            pass
    LOG.warning('[AWS auth] ignoring a sealed cache entry (%s) that does not open with these '
                'credentials (altered, or sealed with another secret): it counts as absent', what)
    try:
        cache.delete(key)
    except (OSError, AttributeError) as e:
        LOG.debug('[AWS auth] could not remove it: %s', type(e).__name__)
    return None, True


def _checked_record(cache, key, record, valid, what):
    """`record` (read from `key`) when `valid(record)`; else None, as _read_record says."""
    if record is None:
        return None
    try:
        ok = valid(record)
    except (ValueError, TypeError, KeyError, AttributeError):
        ok = False
    if ok:
        return record
    LOG.warning('[AWS auth] ignoring a cache entry of an unexpected shape (%s): it counts as absent', what)
    try:
        cache.delete(key)
    except (OSError, AttributeError) as e:
        LOG.debug('[AWS auth] could not remove it: %s', type(e).__name__)
    return None


def _is_time(value):
    if not isinstance(value, str):
        return False
    try:
        _parse_time(value)
    except ValueError:
        return False
    return True


def _valid_session(record):
    return (isinstance(record, dict)
            and all(isinstance(record.get(k), str) and record[k] for k in SESSION_FIELDS[:4])
            and _is_time(record['expiry_time'])
            and ('issued' not in record or _is_time(record['issued'])))


def _valid_codes(record):
    return (isinstance(record, dict) and isinstance(record.get('codes'), list)
            and all(isinstance(e, dict) and isinstance(e.get('code'), str)
                    and (e.get('expiry_time') is None or _is_time(e['expiry_time']))
                    and 'expiry_time' in e
                    for e in record['codes']))


def _valid_duration(record):
    value = isinstance(record, dict) and record.get('duration_seconds')
    return (isinstance(value, int) and not isinstance(value, bool)
            and ROLE_DURATION[0] <= value <= ROLE_DURATION[1])


def _valid_identity(record):
    return isinstance(record, dict) and all(
        isinstance(record.get(k), str) for k in ('method', 'account_id', 'arn', 'partition'))


class _Binding:
    """What a cached session is filed and sealed under: the base credentials
    that obtained it (`key`: no secret in it, only a keyed hash), the keys
    derived from their secret, the credentials to call STS with when they
    are not the account's keys, and whether those are a session (chained)."""
    __slots__ = ('key', 'seal_keys', 'credentials', 'chained')

    def __init__(self, key, seal_keys, credentials, chained):
        self.key, self.seal_keys, self.credentials, self.chained = key, seal_keys, credentials, chained

    def __repr__(self):
        return '<_Binding>'


def _identity_of(method, answer, partition):
    return {'method': method, 'account_id': answer['Account'], 'arn': answer['Arn'],
            'partition': partition}


def _identity_key(frozen):
    """Where describe_identity keeps the identity of credentials: a session's
    by its access key, long-term keys' by the key and an HMAC of the secret."""
    return IDENTITY_KEY_PREFIX + (_hash(frozen.access_key) if frozen.token else
                                  _hash(frozen.access_key, _keyed_digest(frozen.secret_key)))


def _remember_identity(cache, access_key, identity, left):
    seconds = int(left.total_seconds())
    if seconds > 60:
        cache.set(IDENTITY_KEY_PREFIX + _hash(access_key), json.dumps(identity), expire=seconds)


def _seal_keys(base_secret):
    """(encryption key, MAC key) for sealing session records, derived from
    the base credentials' secret: only its holder opens, or forges, a record."""
    secret = base_secret.encode()
    return (hmac.new(secret, SEAL_ENCRYPTION_INFO, hashlib.sha256).digest(),
            hmac.new(secret, SEAL_MAC_INFO, hashlib.sha256).digest())


def _seal(keys, text):
    """Encrypt then authenticate `text`: a random nonce; keystream block i =
    HMAC-SHA256(enc_key, nonce || i as 8 bytes big-endian); ciphertext =
    text XOR keystream; tag = HMAC-SHA256(mac_key, version || nonce ||
    ciphertext), first 16 bytes. Returns 'v1:' + base64(nonce || ciphertext || tag)."""
    enc_key, mac_key = keys
    nonce = os.urandom(SEAL_NONCE_BYTES)
    body = _keystream_xor(enc_key, nonce, text.encode('utf-8'))
    tag = hmac.new(mac_key, SEAL_VERSION + nonce + body, hashlib.sha256).digest()[:SEAL_TAG_BYTES]
    return SEALED_PREFIX + base64.b64encode(nonce + body + tag).decode('ascii')


def _unseal(keys, value):
    """The text _seal sealed with `keys`, or None when `value` does not open
    with them (the tag is checked, in constant time, before decrypting)."""
    enc_key, mac_key = keys
    try:
        blob = base64.b64decode(value[len(SEALED_PREFIX):].encode('ascii'), validate=True)
    except ValueError:          # binascii.Error, or a character outside ASCII
        return None
    if len(blob) < SEAL_NONCE_BYTES + SEAL_TAG_BYTES:
        return None
    nonce, body, tag = blob[:SEAL_NONCE_BYTES], blob[SEAL_NONCE_BYTES:-SEAL_TAG_BYTES], blob[-SEAL_TAG_BYTES:]
    expected = hmac.new(mac_key, SEAL_VERSION + nonce + body, hashlib.sha256).digest()[:SEAL_TAG_BYTES]
    if not hmac.compare_digest(tag, expected):
        return None
    try:
        return _keystream_xor(enc_key, nonce, body).decode('utf-8')
    except UnicodeDecodeError:
        return None


def _keystream_xor(enc_key, nonce, data):
    """`data` XOR the HMAC-SHA256 counter-mode keystream of (enc_key, nonce):
    a 1.5 KB record takes 47 one-shot HMACs."""
    blocks = (len(data) + 31) // 32
    stream = b''.join(hmac.digest(enc_key, nonce + i.to_bytes(8, 'big'), 'sha256')
                      for i in range(blocks))
    size = len(data)
    return (int.from_bytes(data, 'big') ^ int.from_bytes(stream[:size], 'big')).to_bytes(size, 'big')


def _keyed_digest(secret):
    """What a cache key holds of a secret: an HMAC with a constant of that
    purpose, so the key binds the secret without revealing it."""
    return hmac.new(CACHE_KEY_HMAC, secret.encode(), hashlib.sha256).hexdigest()


def _utcnow():
    return datetime.datetime.now(datetime.timezone.utc)


def _hash(*parts):
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:32]


def _format_time(value):
    if isinstance(value, str):
        value = _parse_time(value)
    return value.astimezone(datetime.timezone.utc).strftime('%Y-%m-%dT%H:%M:%SZ')


def _parse_time(text):
    value = datetime.datetime.fromisoformat(text.replace('Z', '+00:00'))
    return value if value.tzinfo else value.replace(tzinfo=datetime.timezone.utc)
