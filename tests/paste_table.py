"""The README's paste table: which file is pasted into Func under which script id.

The README is the single source of those ids; the layout tests and the tier that
runs inside the real Func worker read them from here.
"""
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_ROW = re.compile(r'^\|\s*`(integration_[a-z0-9_]+\.py)`\s*\|\s*`([a-z0-9_]+__[a-z0-9_]+)`\s*\|')


def paste_table(readme=None):
    """{file name: Func script id}, in the README's order."""
    path = readme or os.path.join(ROOT, 'README.md')
    table = {}
    with open(path, encoding='utf-8') as f:
        for line in f:
            match = _ROW.match(line.strip())
            if match:
                table[match.group(1)] = match.group(2)
    if not table:
        raise AssertionError(f'{path}: no paste table rows (| `file.py` | `set__script` | ...)')
    return table
