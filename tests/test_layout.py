"""Every integration_* module works pasted alone into Func: absolute imports of
siblings, the standard library, boto3, botocore and croniter only; nothing done
at import time."""
import ast
import glob
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULES = sorted(glob.glob(os.path.join(ROOT, 'integration_*.py')))
ALLOWED_THIRD_PARTY = {'boto3', 'botocore', 'croniter'}
SIBLINGS = {os.path.basename(p)[:-3] for p in MODULES}
# The runner's `demo` command imports the emulator lazily; Func never runs it.
LOCAL_ONLY = {'demo_emulator'}


def test_the_three_modules_exist():
    names = {os.path.basename(p) for p in MODULES}
    assert {'integration_core__runner.py', 'integration_aws_ec2__main.py',
            'integration_aws_auth.py'} <= names


@pytest.mark.parametrize('path', MODULES, ids=os.path.basename)
def test_imports_are_absolute_and_allowed(path):
    tree = ast.parse(open(path, encoding='utf-8').read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0, f'{path}:{node.lineno}: relative import'
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for name in names:
            top = name.split('.')[0]
            assert (top in sys.stdlib_module_names or top in ALLOWED_THIRD_PARTY
                    or top in SIBLINGS or top in LOCAL_ONLY), f'{path}:{node.lineno}: imports {name}'


@pytest.mark.parametrize('path', MODULES, ids=os.path.basename)
def test_nothing_runs_at_import_time(path):
    """Top level holds only imports, definitions and constant assignments."""
    tree = ast.parse(open(path, encoding='utf-8').read(), path)
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.ClassDef)):
            continue
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            continue   # the docstring
        if isinstance(node, ast.If) and 'main' in ast.unparse(node.test):
            continue   # if __name__ == '__main__'
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            calls = [n for n in _walk_outside_lambdas(node.value) if isinstance(n, ast.Call)]
            for call in calls:
                callee = ast.unparse(call.func)
                assert callee in ('logging.getLogger', 're.compile', 'datetime.timedelta',
                                  'threading.Lock', 'frozenset', 'dict', 'set'), \
                    f'{path}:{node.lineno}: {callee}() runs at import time'
            continue
        pytest.fail(f'{path}:{node.lineno}: statement at import time: {ast.unparse(node)[:80]}')


@pytest.mark.parametrize('path', MODULES, ids=os.path.basename)
def test_loads_alone_by_file_name(path, tmp_path):
    """As Func loads a script: by its file name, from a folder of siblings only,
    without the tests' sys.path, and without opening a socket."""
    for sibling in MODULES:
        (tmp_path / os.path.basename(sibling)).write_text(open(sibling, encoding='utf-8').read())
    code = (
        'import importlib.util, socket, sys\n'
        'def refuse(*a, **k): raise SystemExit("network used at import time")\n'
        'socket.socket.connect = refuse\n'
        f'sys.path[:] = [{str(tmp_path)!r}] + [p for p in sys.path if "site-packages" in p or "lib/python" in p]\n'
        f'name = {os.path.basename(path)[:-3]!r}\n'
        f'spec = importlib.util.spec_from_file_location(name, {str(tmp_path / os.path.basename(path))!r})\n'
        'module = importlib.util.module_from_spec(spec); sys.modules[name] = module\n'
        'spec.loader.exec_module(module)\n'
        'import threading; assert threading.active_count() == 1, "a thread started at import"\n'
        'print("ok")\n')
    result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                            cwd=str(tmp_path), timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == 'ok', result.stderr


def _walk_outside_lambdas(node):
    """ast.walk, but a lambda's body runs when called, not at import."""
    yield node
    for child in ast.iter_child_nodes(node):
        if not isinstance(child, ast.Lambda):
            yield from _walk_outside_lambdas(child)
