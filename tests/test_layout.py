"""Every module of the README's paste table works pasted alone into Func:
absolute imports of siblings (by their Func script ids, or by file name in a
checkout), the standard library, boto3, botocore and croniter only; nothing
done at import time; nothing Func's safe scope lacks; Python 3.8 syntax."""
import ast
import glob
import os
import shutil
import subprocess
import sys

import pytest

from paste_table import paste_table

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PASTED = paste_table()                      # {file name: Func script id}
MODULES = [os.path.join(ROOT, name) for name in PASTED]
ALLOWED_THIRD_PARTY = {'boto3', 'botocore', 'croniter'}
SIBLINGS = {name[:-3] for name in PASTED} | set(PASTED.values())
# `python -m integration_core__runner` hands over to the local runtime, under
# `if __name__ == '__main__'`, which never runs in Func (__name__ is the script id).
LOCAL_ONLY = {'integration_local'}
IMPORT_TIME_CALLS = ('logging.getLogger', 're.compile', 'datetime.timedelta',
                     'threading.Lock', 'frozenset', 'dict', 'set')


def test_every_top_level_module_is_in_the_paste_table():
    on_disk = {os.path.basename(p) for p in glob.glob(os.path.join(ROOT, 'integration_*.py'))}
    assert on_disk == set(PASTED), 'README paste table and the integration_*.py files differ'
    assert {'integration_core__runner.py', 'integration_aws_ec2__main.py',
            'integration_aws_auth.py'} <= on_disk
    for name, script_id in PASTED.items():
        assert script_id.count('__') == 1 and not script_id.startswith('_'), \
            f'{name}: {script_id} is not a Func script id (<script set>__<script>)'


@pytest.mark.parametrize('path', MODULES, ids=os.path.basename)
def test_imports_are_absolute_and_allowed(path):
    tree = ast.parse(open(path, encoding='utf-8').read(), path)
    main_block = {id(n) for node in tree.body if _is_main_block(node) for n in ast.walk(node)}
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
            allowed = (top in sys.stdlib_module_names or top in ALLOWED_THIRD_PARTY
                       or top in SIBLINGS or (top in LOCAL_ONLY and id(node) in main_block))
            assert allowed, f'{path}:{node.lineno}: imports {name}'


@pytest.mark.parametrize('path', MODULES, ids=os.path.basename)
def test_siblings_are_imported_by_script_id_first(path):
    """In Func only script ids import; a file name is the checkout's fallback."""
    text = open(path, encoding='utf-8').read()
    for name, script_id in PASTED.items():
        module = name[:-3]
        if module != script_id and f'import {module}' in text:
            assert text.index(f'import {script_id}') < text.index(f'import {module}'), \
                f'{path}: imports {module} without trying the script id {script_id} first'


@pytest.mark.parametrize('path', MODULES, ids=os.path.basename)
def test_no_name_that_funcs_safe_scope_lacks(path):
    tree = ast.parse(open(path, encoding='utf-8').read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and node.id == 'BaseException':
            pytest.fail(f'{path}:{node.lineno}: BaseException is not defined in Func')


@pytest.mark.parametrize('path', MODULES, ids=os.path.basename)
def test_nothing_runs_at_import_time(path):
    """Top level holds only imports, definitions and constant assignments."""
    tree = ast.parse(open(path, encoding='utf-8').read(), path)
    for node in tree.body:
        _check_top_level(node, path)


def _check_top_level(node, path):
    if isinstance(node, (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.ClassDef, ast.Raise)):
        return
    if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
        return   # the docstring
    if _is_main_block(node):
        return
    if isinstance(node, (ast.Try, ast.If)):
        # The sibling import: by script id, else by file name.
        for child in node.body + getattr(node, 'orelse', []) + [
                n for h in getattr(node, 'handlers', []) for n in h.body]:
            _check_top_level(child, path)
        return
    if isinstance(node, (ast.Assign, ast.AnnAssign)):
        calls = [n for n in _walk_outside_lambdas(node.value) if isinstance(n, ast.Call)]
        for call in calls:
            callee = ast.unparse(call.func)
            assert callee in IMPORT_TIME_CALLS, f'{path}:{node.lineno}: {callee}() runs at import time'
        return
    pytest.fail(f'{path}:{node.lineno}: statement at import time: {ast.unparse(node)[:80]}')


def _is_main_block(node):
    return isinstance(node, ast.If) and '__main__' in ast.unparse(node.test)


LOADER = '''
import importlib.util, socket, sys, threading
def refuse(*a, **k): raise SystemExit("network used at import time")
socket.socket.connect = refuse
sys.path[:] = [{folder!r}] + [p for p in sys.path if "site-packages" in p or "lib/python" in p]
# Not the checkout's editable install either: only this folder's files.
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in str(f).lower()]
name = {name!r}
spec = importlib.util.spec_from_file_location(name, {file!r})
module = importlib.util.module_from_spec(spec); sys.modules[name] = module
spec.loader.exec_module(module)
assert threading.active_count() == 1, "a thread started at import"
print("ok")
'''


@pytest.mark.parametrize('layout', ['file names', 'script ids'])
@pytest.mark.parametrize('path', MODULES, ids=os.path.basename)
def test_loads_alone(path, layout, tmp_path):
    """As a checkout holds the modules (file names) and as Func holds them
    (script ids only): from a folder of siblings, without the tests' sys.path,
    and without opening a socket."""
    for name, script_id in PASTED.items():
        target = name if layout == 'file names' else script_id + '.py'
        shutil.copy(os.path.join(ROOT, name), tmp_path / target)
    mine = os.path.basename(path)
    name = mine[:-3] if layout == 'file names' else PASTED[mine]
    code = LOADER.format(folder=str(tmp_path), name=name, file=str(tmp_path / (name + '.py')))
    result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                            cwd=str(tmp_path), timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == 'ok', result.stderr


def test_a_missing_auth_script_is_one_clear_line(tmp_path):
    """A user who pasted the collector but not the auth module."""
    for name in ('integration_core__runner.py', 'integration_aws_ec2__main.py'):
        shutil.copy(os.path.join(ROOT, name), tmp_path / name)
    code = LOADER.format(folder=str(tmp_path), name='integration_aws_ec2__main',
                         file=str(tmp_path / 'integration_aws_ec2__main.py'))
    result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                            cwd=str(tmp_path), timeout=120)
    assert result.returncode != 0
    assert ('ImportError: integration_aws_ec2__main needs integration_aws_auth.py: paste it into '
            'Func as the script set `integration_aws`, script `auth`') in result.stderr


def _python38():
    """pyenv's 3.8 (its shim needs a pyenv version set), else one on PATH."""
    pyenv_root = os.environ.get('PYENV_ROOT', os.path.expanduser('~/.pyenv'))
    candidates = sorted(glob.glob(os.path.join(pyenv_root, 'versions', '3.8*', 'bin', 'python3.8')))
    if candidates:
        return candidates[-1]
    found = shutil.which('python3.8')
    return found if found and '/shims/' not in found else None


LOCAL_RUNTIME = sorted(glob.glob(os.path.join(ROOT, 'integration_local', '*.py')))


@pytest.mark.parametrize('path', MODULES + LOCAL_RUNTIME, ids=os.path.basename)
def test_python_38_compiles_it(path):
    """Func's worker runs Python 3.8 (and pyproject promises 3.8 for the local
    runtime too): nothing newer in the syntax."""
    python = _python38()
    if python is None:
        if os.environ.get('CI') == 'true':
            pytest.fail('Python 3.8 is missing (pyenv install 3.8): CI must check Func\'s Python')
        pytest.skip('no Python 3.8 on this machine (pyenv install 3.8) to check Func\'s syntax')
    result = subprocess.run([python, '-c', 'import ast, sys; ast.parse(open(sys.argv[1]).read(), '
                             'feature_version=(3, 8)); compile(open(sys.argv[1]).read(), sys.argv[1], '
                             '"exec")', path], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def _walk_outside_lambdas(node):
    """ast.walk, but a lambda's body runs when called, not at import."""
    yield node
    for child in ast.iter_child_nodes(node):
        if not isinstance(child, ast.Lambda):
            yield from _walk_outside_lambdas(child)
