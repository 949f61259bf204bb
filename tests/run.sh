#!/bin/sh
# Set up and run the whole test suite: ruff (with the bandit security rules),
# the Sphinx docs with -W and their doctests, and pytest under branch
# coverage with 100% enforced.  This is the test command README.rst gives;
# .ci/run calls it verbatim.  Extra arguments are passed to pytest.
set -eu
cd "$(dirname "$0")/.."

# Postfix's smtp-sink, used by the fault-injection tests.
if ! [ -x /usr/sbin/smtp-sink ] && ! command -v smtp-sink >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        apt-get update -qq
        echo "postfix postfix/main_mailer_type select No configuration" \
            | debconf-set-selections
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postfix >/dev/null
    else
        echo "smtp-sink not found and not root: its tests will be skipped" >&2
    fi
fi

# PostgreSQL's server, which the tests of the PostgreSQL queue start in a
# temporary folder of their own.
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 \
        && ! command -v initdb >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
    else
        echo "PostgreSQL not found and not root: its tests will be skipped" >&2
    fi
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[test,docs]'

.venv/bin/ruff check src tests benchmarks examples reliability
.venv/bin/sphinx-build -W -q -b html docs docs/_build/html
.venv/bin/sphinx-build -W -q -b doctest docs docs/_build/doctest

rm -f .coverage .coverage.* .pytest-results.xml
tests_status=0
.venv/bin/coverage run -m pytest --junitxml=.pytest-results.xml "$@" \
    || tests_status=$?
.venv/bin/coverage combine -q
coverage_status=0
.venv/bin/coverage report || coverage_status=$?
.venv/bin/python - <<'PY'
import xml.etree.ElementTree as ET
suite = ET.parse(".pytest-results.xml").getroot()
suite = suite if suite.tag == "testsuite" else suite[0]
tests, failures, errors, skipped = (
    int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")
)
failed = failures + errors
print(f"{tests - failed - skipped} passed, {failed} failed, {skipped} skipped")
PY
[ "$tests_status" = 0 ] && [ "$coverage_status" = 0 ]
