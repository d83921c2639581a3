#!/usr/bin/env bash
# Set up and run every test: InfluxDB 1.x (Debian's influxdb, the real
# line-protocol parser the tests use), a virtualenv with the test extras, pytest.
set -euo pipefail
cd "$(dirname "$0")"

if ! command -v influxd >/dev/null 2>&1; then
    echo "installing influxdb (Debian package) for the line-protocol tests ..."
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq influxdb >/dev/null
fi

PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'

# --- Func tier (tests/functier): Redis, MariaDB and Func's Python 3.8 venv,
# prepared only where the DataFlux Func worker source is present.
FUNC_SRC_DIR="${FUNC_SRC:-../shared/dataflux-func}"
if [ -f "$FUNC_SRC_DIR/worker/app.py" ]; then
    FUNC_SRC="$FUNC_SRC_DIR" bash tests/functier/setup.sh
fi
# --- end Func tier

set +e
.venv/bin/python -m pytest "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then
    echo "pytest collected no tests: that is a failure" >&2
    exit 1
fi
exit "$status"
