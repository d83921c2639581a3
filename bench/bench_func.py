"""Per-task CPU inside the real DataFlux Func worker (issue 8 item 6): does the
botocore data loader kept in sys.modules['_integration_aws_shared'] make the
second and later tasks of a worker process cheap?

    python bench/bench_func.py                  # 3 rounds x 11 tasks a variant, about 1-2 minutes
    python bench/bench_func.py --tasks 8 --rounds 2 --json FILE

It drives Func's own worker (tests/functier/harness.py: Func 5.1.7's worker
code under Python 3.8 with boto3 1.37.38, real Redis and MariaDB on loopback)
against moto with IAM enforcement on (an estate like tests/functier's: an IAM
user of aws-cn, a role with an ExternalId, 3 instances in cn-northwest-1) and a
DataKit receiver. The project's modules are published under the paste table's
script ids, and the seed's startup scripts with the placeholders filled:
scripts/1_iam_user.py and scripts/2_assume_role.py. INTEGRATION_FORCE is set
as a Func environment variable, so every task collects.

For each script, in each round, in a fresh worker process with DFF.CACHE
emptied (so task 1 is the first task of a worker process, and the role
session is assumed in task 1 and kept in Func's Redis after it):

  kept      the script's function run --tasks times: what users get.
  dropped   the same, with sys.modules['_integration_aws_shared'] deleted by a
            tiny published script run (and not counted) before each task: the
            baseline, everything rebuilt in every task, as before the shared
            loader existed.
  bound     the same AWS calls (as moto's recorder saw a later task make them)
            made with clients built once in an earlier task and kept in
            sys.modules, with their credentials: what is left when nothing is
            rebuilt (the modules keep their clients too, but never a
            credential: each task's session gives its own to the clients it
            takes; a bound, not a design).
  empty     a function that does nothing: Func's own cost of a task.

CPU is the worker process's CPU time (all threads) from the task's start to
its end, as the harness measures it (TaskResult.cpu). Task 1 is reported per
round (median over rounds); tasks 2..N are pooled over rounds (median, with
the mean and the maximum of the kept variant: about one task in ten pays
Python's full cyclic garbage collection, which frees what the earlier tasks'
module bodies left, so the default 11 tasks a worker span one).
Goal: tasks 2..N <= 0.1 s of CPU each, without sharing anything unsafe: at
the end, a published script walks what sys.modules['_integration_aws_shared']
holds and reports any credentials object or secret found in it.

Without Func's source ($FUNC_SRC or ../shared/dataflux-func) it says so in one
line and exits 0. It reuses tests/functier/setup.sh for the Python 3.8 venv.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, 'tests'))

REGION = 'cn-northwest-1'
GOAL = 0.1
SCRIPTS = [('1_iam_user.py', 'my_aws__bench_iam_user'), ('2_assume_role.py', 'my_aws__bench_assume_role')]

DROP_CODE = '''import sys

@DFF.API('bench: drop the shared loader', timeout=30)
def run():
    return sys.modules.pop('_integration_aws_shared', None) is not None
'''

EMPTY_CODE = '''@DFF.API('bench: nothing', timeout=30)
def run():
    return None
'''

# The bound: the same calls with clients built once and kept in the process.
BOUND_CODE = '''import sys
import types
import boto3

HOLDER = '_bench_bound_clients'


@DFF.API('bench: the same calls with pre-built clients', timeout=60)
def run(account, calls, build=False):
    held = sys.modules.get(HOLDER)
    if build or held is None:
        held = types.ModuleType(HOLDER)
        keys = boto3.session.Session(aws_access_key_id=account['ak_id'],
                                     aws_secret_access_key=account['ak_secret'],
                                     region_name=account['region'])
        session = keys
        if account.get('assume_role_arn'):
            creds = keys.client('sts').assume_role(
                RoleArn=account['assume_role_arn'], ExternalId=account['external_id'],
                RoleSessionName=account['role_session_name'])['Credentials']
            session = boto3.session.Session(aws_access_key_id=creds['AccessKeyId'],
                                            aws_secret_access_key=creds['SecretAccessKey'],
                                            aws_session_token=creds['SessionToken'],
                                            region_name=account['region'])
        held.clients = {name: session.client(name) for name in ('sts', 'ec2')}
        sys.modules[HOLDER] = held
        return 'built'
    for service, method, params in calls:
        getattr(held.clients[service], method)(**params)
    return len(calls)
'''

# What the shared module holds, walked: credentials objects, secrets.
INSPECT_CODE = '''import sys
import types
import botocore.credentials

SECRET_NAMES = ('secret_key', 'secretaccesskey', 'ak_secret', 'token', 'sessiontoken', 'session_token')


@DFF.API('bench: what the shared module holds', timeout=120)
def run(secrets):
    shared = sys.modules.get('_integration_aws_shared')
    if shared is None:
        return {'present': False}
    found, seen, walked = [], set(), 0
    stack = [(name, value, 0) for name, value in vars(shared).items() if not name.startswith('__')]
    while stack and walked < 3000000:
        path, obj, depth = stack.pop()
        if id(obj) in seen or depth > 20:
            continue
        seen.add(id(obj))
        walked += 1
        if isinstance(obj, str):
            if any(s and s in obj for s in secrets):
                found.append(path + ': a secret')
            continue
        if isinstance(obj, (int, float, bytes, type(None), type, type(sys))):
            continue
        if isinstance(obj, types.FunctionType):     # closures (not globals)
            for index, cell in enumerate(obj.__closure__ or ()):
                stack.append((path + '.<closure ' + str(index) + '>', cell.cell_contents, depth + 1))
            continue
        if isinstance(obj, types.MethodType):
            stack.append((path + '.__self__', obj.__self__, depth + 1))
            continue
        if isinstance(obj, botocore.credentials.Credentials):
            found.append(path + ': ' + type(obj).__name__)
            continue
        if isinstance(obj, dict):
            for key, value in obj.items():
                if isinstance(key, str) and key.lower() in SECRET_NAMES and isinstance(value, str) and value:
                    found.append(path + '[' + key + ']')
                stack.append((path + '[' + repr(key)[:40] + ']', value, depth + 1))
        elif isinstance(obj, (list, tuple, set, frozenset)):
            for index, value in enumerate(obj):
                stack.append((path + '[' + str(index) + ']', value, depth + 1))
        else:
            attributes = dict(getattr(obj, '__dict__', None) or {})
            for name in getattr(type(obj), '__slots__', ()):
                if isinstance(name, str) and hasattr(obj, name):
                    attributes[name] = getattr(obj, name)
            for key, value in attributes.items():
                stack.append((path + '.' + key, value, depth + 1))
    return {'present': True, 'keys': sorted(map(str, shared.data)),
            'types': {str(k): type(v).__name__ for k, v in shared.data.items()},
            'objects_walked': walked, 'found': found[:20]}
'''


def one_line(error):
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def prepare(func_src):
    """tests/functier/setup.sh: the Python 3.8 venv (and Debian's servers)."""
    env = dict(os.environ, FUNC_SRC=func_src)
    done = subprocess.run(['bash', os.path.join(ROOT, 'tests', 'functier', 'setup.sh')], env=env,
                          capture_output=True, text=True, timeout=900)
    if done.returncode:
        lines = (done.stderr.strip() or done.stdout.strip() or 'no output').splitlines()
        raise SystemExit(f'bench_func: tests/functier/setup.sh failed: {lines[-1]}')


def build_estate(aws):
    """As tests/functier's seed_estate: a user, a role with an ExternalId, instances."""
    from integration_local.emulator import USER_POLICY
    stamp = f'{os.getpid()}-{int(time.time())}'
    aws.run_instances(REGION, 3, name=f'seed-bench-{stamp}')
    user = aws.make_user(f'collector-bench-{stamp}', 'aws-cn', policy=USER_POLICY)
    external_id = f'ext-bench-{stamp}'
    role = aws.make_role(f'reader-bench-{stamp}', user['arn'], 'aws-cn', external_id=external_id)
    return {
        '<AWS AK ID>': user['ak_id'], '<AWS AK SECRET>': user['ak_secret'],
        '<AWS ASSUME ROLE ARN>': role, '<AWS EXTERNAL ID>': external_id,
        '<AWS ROLE SESSION NAME>': 'Integration',
    }


def startup_code(filename, values):
    from integration_local.emulator import fill_placeholders
    with open(os.path.join(ROOT, 'scripts', filename), encoding='utf-8') as f:
        return fill_placeholders(f.read(), values)


def bound_account(values, filename):
    account = {'ak_id': values['<AWS AK ID>'], 'ak_secret': values['<AWS AK SECRET>'], 'region': REGION}
    if 'assume_role' in filename:
        account.update(assume_role_arn=values['<AWS ASSUME ROLE ARN>'],
                       external_id=values['<AWS EXTERNAL ID>'],
                       role_session_name=values['<AWS ROLE SESSION NAME>'])
    return account


# What moto's recorder shows, as the bound's client calls.
KNOWN_CALLS = {
    ('sts', 'GetCallerIdentity'): ('sts', 'get_caller_identity', {}),
    ('ec2', 'DescribeInstances'): ('ec2', 'describe_instances', {'MaxResults': int, 'NextToken': str}),
    ('ec2', 'DescribeRegions'): ('ec2', 'describe_regions', {}),
}


def as_client_calls(recorded):
    out = []
    for call in recorded:
        known = KNOWN_CALLS.get((call['service'], call['action']))
        if known is None:
            raise SystemExit(f"bench_func: a later task called {call['service']}:{call['action']}, "
                             'which the bound does not know how to repeat: add it to KNOWN_CALLS')
        service, method, types = known
        params = {k: types[k](v) for k, v in call['params'].items() if k in types}
        out.append([service, method, params])
    return out


def check(result, what):
    if result.status != 'success':
        raise SystemExit(f'bench_func: {what} ended {result.status}: {one_line(result.exception or "")}'
                         f'\n{result}')
    return result


def run_tasks(func, func_id, tasks, drop, record=None):
    """`tasks` runs of func_id in the current worker process; their CPU and wall."""
    out = []
    for n in range(tasks):
        if drop:
            check(func.run('bench__drop_shared.run'), 'the drop script')
        if record is not None and n < 2:
            with record() as calls:
                r = check(func.run(func_id), func_id)
            out.append({'cpu': r.cpu, 'wall': r.wall,
                        'calls': [f"{c['service']}:{c['action']}" for c in calls], 'recorded': calls})
        else:
            r = check(func.run(func_id), func_id)
            out.append({'cpu': r.cpu, 'wall': r.wall})
    return out


def measure(func, aws, values, tasks, rounds, secrets):
    results = {filename: {'kept': [], 'dropped': [], 'bound': [], 'calls': None}
               for filename, _ in SCRIPTS}
    results['empty'] = []
    inspected = None
    for round_number in range(1, rounds + 1):
        for filename, script_id in SCRIPTS:
            func_id = f'{script_id}.run'
            row = results[filename]
            for variant in ('kept', 'dropped'):
                print(f'  round {round_number}/{rounds}: {filename} {variant} ...', file=sys.stderr)
                func.clear_cache()
                func.restart_worker()
                record = aws.recording if row['calls'] is None and variant == 'kept' else None
                runs = run_tasks(func, func_id, tasks, drop=variant == 'dropped', record=record)
                if record:
                    row['calls'] = {'task 1': runs[0]['calls'], 'task 2': runs[1]['calls']}
                    row['later_calls'] = as_client_calls(runs[1]['recorded'])
                    for r in runs[:2]:
                        del r['recorded']
                row[variant].append(runs)
                if variant == 'kept' and inspected is None and filename == SCRIPTS[-1][0]:
                    inspected = check(func.run('bench__inspect_shared.run', kwargs={'secrets': secrets}),
                                      'the inspect script').result
            # The bound, in the same worker: built once, then `tasks` runs.
            account = bound_account(values, filename)
            check(func.run('bench__bound.run', kwargs={'account': account, 'calls': [], 'build': True}),
                  'the bound (build)')
            for _ in range(tasks):
                r = check(func.run('bench__bound.run', kwargs={'account': account,
                                                               'calls': row['later_calls']}), 'the bound')
                row['bound'].append({'cpu': r.cpu, 'wall': r.wall})
        func.run('bench__empty.run')
        for _ in range(tasks):
            r = check(func.run('bench__empty.run'), 'the empty script')
            results['empty'].append({'cpu': r.cpu, 'wall': r.wall})
    return results, inspected


def summarize(results, tasks, rounds):
    med = statistics.median
    rows = []
    for filename, _ in SCRIPTS:
        r = results[filename]
        row = {'script': filename, 'calls': r['calls']}
        for variant in ('kept', 'dropped'):
            row[f'{variant}_first'] = med(runs[0]['cpu'] for runs in r[variant])
            row[f'{variant}_later'] = med(t['cpu'] for runs in r[variant] for t in runs[1:])
            later = [t['cpu'] for runs in r[variant] for t in runs[1:]]
            row[f'{variant}_later_mean'] = statistics.mean(later)
            row[f'{variant}_later_max'] = max(later)
            row[f'{variant}_later_wall'] = med(t['wall'] for runs in r[variant] for t in runs[1:])
            row[f'{variant}_all'] = [[t['cpu'] for t in runs] for runs in r[variant]]
        row['bound'] = med(t['cpu'] for t in r['bound'])
        row['bound_all'] = [t['cpu'] for t in r['bound']]
        row['goal_ok'] = row['kept_later'] <= GOAL
        rows.append(row)
    empty = med(t['cpu'] for t in results['empty'])
    return rows, empty


def report(rows, empty, inspected, tasks, rounds):
    lines = [
        f'CPU of the Func worker process per task (s): task 1 of a fresh worker (median of {rounds} '
        f'workers), tasks 2..{tasks} (median of {rounds * (tasks - 1)})',
        '',
        '| script | task 1: kept / dropped | tasks 2..N: kept / dropped / bound | dropped / kept '
        '| kept / bound | kept, tasks 2..N: mean / max | goal tasks 2..N <= 0.1 s '
        '| AWS calls, task 1 -> later tasks |',
        '|---|---|---|---|---|---|---|---|',
    ]
    for r in rows:
        calls = r['calls'] or {}
        lines.append(
            f"| {r['script']} | {r['kept_first']:.3f} / {r['dropped_first']:.3f} "
            f"| {r['kept_later']:.3f} / {r['dropped_later']:.3f} / {r['bound']:.3f} "
            f"| {r['dropped_later'] / r['kept_later']:.1f}x | {r['kept_later'] / r['bound']:.2f}x "
            f"| {r['kept_later_mean']:.3f} / {r['kept_later_max']:.3f} "
            f"| {'MET' if r['goal_ok'] else 'MISSED'} ({r['kept_later']:.3f} s) "
            f"| {', '.join(calls.get('task 1', []))} -> {', '.join(calls.get('task 2', []))} |")
    lines += [
        '',
        f'Func\'s own cost of a task (a function that does nothing): {empty:.3f} s of CPU',
    ]
    for r in rows:
        lines.append(f"{r['script']}: kept, every task of every worker: {r['kept_all']}")
        lines.append(f"{r['script']}: dropped, every task of every worker: {r['dropped_all']}")
    if inspected is not None:
        if not inspected.get('present'):
            lines.append('\nsys.modules[\'_integration_aws_shared\']: absent after the kept tasks')
        else:
            lines.append(
                f"\nsys.modules['_integration_aws_shared'] after the kept tasks of {SCRIPTS[-1][0]}: "
                f"{inspected['types']}; {inspected['objects_walked']:,} objects walked; "
                + ('no credentials object and no secret found' if not inspected['found']
                   else 'FOUND: ' + '; '.join(inspected['found'])))
    return '\n'.join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--tasks', type=int, default=11,
                        help='tasks a worker process runs (default 11: task 1 and ten more, which '
                        'span one full cyclic garbage collection)')
    parser.add_argument('--rounds', type=int, default=3, help='fresh workers per variant (default 3)')
    parser.add_argument('--json', metavar='FILE', help='also write the raw figures')
    args = parser.parse_args()
    if args.tasks < 2:
        parser.error('--tasks must be at least 2')

    from tests.functier.harness import FuncTierError, FuncWorker, locate_func_src
    func_src, missing = locate_func_src()
    if missing:
        print(f'bench_func: skipped: {missing}')
        return 0
    try:
        import moto  # noqa: F401  the AWS the tasks talk to
    except ImportError:
        print('bench_func: skipped: moto is not installed here (pip install -e ".[test]")')
        return 0
    started = time.monotonic()
    print('bench_func: preparing the Python 3.8 venv (tests/functier/setup.sh) ...', file=sys.stderr)
    prepare(func_src)

    from integration_local.emulator import AwsEmulator
    from servers import DataKitReceiver
    aws = AwsEmulator().start()
    receiver = func = None
    workdir = tempfile.mkdtemp(prefix='bench-func-')
    try:
        aws.admin('aws')
        aws.admin('aws-cn')
        aws.enforce()
        values = build_estate(aws)
        receiver = DataKitReceiver()
        func = FuncWorker(func_src, workdir=workdir, env={'AWS_ENDPOINT_URL': aws.url}).start()
        print(f'bench_func: Func worker up ({time.monotonic() - started:.0f} s)', file=sys.stderr)
        func.publish_project_modules()
        func.set_datakit(receiver.url)
        func.set_env('INTEGRATION_FORCE', '1')
        for filename, script_id in SCRIPTS:
            func.publish(script_id, startup_code(filename, values))
        func.publish('bench__drop_shared', DROP_CODE)
        func.publish('bench__empty', EMPTY_CODE)
        func.publish('bench__bound', BOUND_CODE)
        func.publish('bench__inspect_shared', INSPECT_CODE)
        python = func.call('ping')['python']
        secrets = [values['<AWS AK SECRET>']]
        results, inspected = measure(func, aws, values, args.tasks, args.rounds, secrets)
    except FuncTierError as e:
        raise SystemExit(f'bench_func: the Func worker failed: {one_line(e)}')
    finally:
        if func is not None:
            func.stop()
        if receiver is not None:
            receiver.stop()
        aws.stop()
    rows, empty = summarize(results, args.tasks, args.rounds)
    print(f'bench_func: Func worker under Python {python}; {args.rounds} round(s) x {args.tasks} '
          f'task(s) a variant; {os.cpu_count()} CPU(s)\n')
    print(report(rows, empty, inspected, args.tasks, args.rounds))
    seconds = time.monotonic() - started
    if args.json:
        with open(args.json, 'w') as f:
            json.dump({'date': time.strftime('%Y-%m-%d'), 'python': python, 'tasks': args.tasks,
                       'rounds': args.rounds, 'rows': rows, 'empty': empty, 'inspected': inspected,
                       'seconds': round(seconds)}, f, indent=2)
    print(f'\n(bench took {seconds:.0f} s)', file=sys.stderr)
    return 0


if __name__ == '__main__':
    sys.exit(main())
