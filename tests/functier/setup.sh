#!/usr/bin/env bash
# Prepare the tier that runs our modules inside the real DataFlux Func worker:
#   - Debian's redis-server, mariadb-server and libpq-dev (psycopg2 in Func's
#     requirements builds against it), installed only when missing;
#   - a Python 3.8 virtualenv (Func's image runs 3.8) holding Func's own
#     requirements.txt plus boto3, which Func users add themselves; 1.37.38 is
#     the newest boto3 that supports 3.8.
# Idempotent: a stamp in the venv records what was installed, so a second run
# only checks and returns. Environment: FUNC_SRC (Func's source, default
# ../shared/dataflux-func beside the repo), FUNC_VENV (default .func-venv in the
# repo root), PYTHON38 (a python3.8 to use instead of pyenv's or PATH's).
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
FUNC_SRC="${FUNC_SRC:-$ROOT/../shared/dataflux-func}"
VENV="${FUNC_VENV:-$ROOT/.func-venv}"
EXTRA_PINS="boto3==1.37.38"
DEBIAN_PACKAGES="redis-server mariadb-server libpq-dev"

die() { echo "functier setup: $*" >&2; exit 1; }

[ -f "$FUNC_SRC/requirements.txt" ] || die "DataFlux Func source not found at $FUNC_SRC (set FUNC_SRC)"

# -- Debian packages ---------------------------------------------------------
missing=""
for pkg in $DEBIAN_PACKAGES; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing="$missing $pkg"
done
if [ -n "$missing" ]; then
    echo "functier setup: installing Debian packages:$missing"
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    # The tests start their own private servers; keep the packages' init
    # scripts from starting system services during the install.
    made_policy=""
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null
        $SUDO chmod +x /usr/sbin/policy-rc.d
        made_policy=1
    fi
    $SUDO apt-get update -qq
    # shellcheck disable=SC2086
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null \
        || { [ -n "$made_policy" ] && $SUDO rm -f /usr/sbin/policy-rc.d; die "apt-get install failed:$missing"; }
    [ -n "$made_policy" ] && $SUDO rm -f /usr/sbin/policy-rc.d
fi

# -- Python 3.8 ----------------------------------------------------------------
find_python38() {
    if [ -n "${PYTHON38:-}" ]; then echo "$PYTHON38"; return; fi
    local root candidate
    if command -v pyenv >/dev/null 2>&1; then
        root="$(pyenv root)"
    else
        root="${PYENV_ROOT:-$HOME/.pyenv}"
    fi
    for candidate in "$root"/versions/3.8*/bin/python3.8; do
        [ -x "$candidate" ] && { echo "$candidate"; return; }
    done
    command -v python3.8 2>/dev/null || true
}
PY38="$(find_python38)"
[ -n "$PY38" ] && [ -x "$PY38" ] || die "no Python 3.8 found (pyenv versions/3.8*, python3.8 on PATH, or PYTHON38)"

# -- the venv ----------------------------------------------------------------
stamp_of() {
    {
        cat "$FUNC_SRC/requirements.txt"
        echo "$EXTRA_PINS"
        "$PY38" -c 'import sys; print(sys.version)'
    } | sha256sum | cut -d' ' -f1
}
want="$(stamp_of)"
stamp_file="$VENV/.functier-stamp"
if [ -x "$VENV/bin/python" ] && [ -f "$stamp_file" ] && [ "$(cat "$stamp_file")" = "$want" ]; then
    exit 0
fi

echo "functier setup: building the Python 3.8 venv for Func at $VENV ..."
start=$SECONDS
rm -rf "$VENV"
"$PY38" -m venv "$VENV"
# Func's own pins first, then boto3 (its botocore follows; both accept Func's
# urllib3 and python-dateutil pins).
# pip's own chatter (deprecations, the machine's extra index warnings) goes to
# a log that is shown only when the install fails.
pip_log="$VENV/pip-install.log"
# shellcheck disable=SC2086
if ! "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-input \
        -r "$FUNC_SRC/requirements.txt" $EXTRA_PINS >"$pip_log" 2>&1; then
    tail -n 30 "$pip_log" >&2
    die "pip install of Func's requirements into $VENV failed (log: $pip_log)"
fi
"$VENV/bin/python" -W ignore -c 'import boto3, botocore, croniter, timeout_decorator, pymysql, redis' \
    || die "the venv at $VENV cannot import Func's packages"
echo "$want" > "$stamp_file"
echo "functier setup: venv ready in $((SECONDS - start)) s"
