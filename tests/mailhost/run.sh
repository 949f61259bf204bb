#!/bin/sh
# The Products.MailHost job: Products.MailHost (the mail host of every Zope
# and Plone site) on mailoutbox, through the zope.sendmail alias of
# compat/zope.sendmail-alias.
#
# In its own virtualenv (.venv-mailhost) it installs Zope, Products.MailHost
# from its sdist (which holds its tests), mailoutbox from this checkout and
# the alias, but not zope.sendmail; then it runs, in one pytest session,
# MailHost's own test suite and tests/mailhost/e2e_mailhost.py (MailHost's
# immediate, direct and queued sends against real SMTP servers, and a relay
# with a private CA trusted through SSL_CERT_FILE).  Its last line is
# "N passed, N failed"; it exits non-zero when a test failed.
# Extra arguments are passed to pytest.  Needs python3 (PYTHON=...) and
# PyPI.
set -eu
cd "$(dirname "$0")/../.."
ROOT=$PWD
VENV=$ROOT/.venv-mailhost
WORK=$VENV/work
MAILHOST_VERSION=6.1

# MailHost tests excluded, each for a reason given beside it, joined into a
# pytest -k expression: only tests that check zope.sendmail's private
# internals, never a behaviour a site can meet.  None today.
EXCLUDE=""

[ -x "$VENV/bin/python" ] || "${PYTHON:-python3}" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check "$@"; }

# Products.MailHost's sdist: the wheel is not guaranteed to hold the tests.
SDIST=$WORK/Products.MailHost-$MAILHOST_VERSION
if ! [ -f "$SDIST/PKG-INFO" ]; then
    rm -rf "$WORK/download" "$SDIST"
    mkdir -p "$WORK/download" "$SDIST"
    pip download -q --no-binary :all: --no-deps --dest "$WORK/download" \
        "Products.MailHost==$MAILHOST_VERSION"
    tar -xzf "$WORK"/download/*.tar.gz -C "$SDIST" --strip-components=1
fi

# pip builds local folders in place: no stale build/ may add removed files.
rm -rf "$ROOT/build" "$ROOT/compat/zope.sendmail-alias/build"
# MailHost's requirements but zope.sendmail, which the alias replaces.
sed -n 's/^Requires-Dist: //p' "$SDIST/PKG-INFO" | grep -v 'extra ==' \
    | grep -iv '^zope[._-]sendmail' >"$WORK/mailhost-requirements.txt"
pip install -q -r "$WORK/mailhost-requirements.txt" \
    'Zope >= 6.0' 'pytest >= 7' 'aiosmtpd >= 1.4' 'cryptography >= 3' \
    'zope.testing >= 4' "$ROOT"
pip install -q --no-deps --force-reinstall "$SDIST"
# What docs/migrating.rst tells a site: no zope.sendmail, then the alias.
if pip show -q zope.sendmail >/dev/null 2>&1; then
    pip uninstall -q -y zope.sendmail
fi
pip install -q --no-deps --force-reinstall "$ROOT/compat/zope.sendmail-alias"

rm -f "$WORK/results.xml"
status=0
(
    cd "$WORK"
    # At most 15 minutes: MailHost waits without a limit for its queue
    # thread to stop.
    timeout -k 30 900 "$VENV/bin/python" -m pytest -c "$ROOT/tests/mailhost/pytest.ini" \
        --rootdir "$WORK" --continue-on-collection-errors \
        --junitxml "$WORK/results.xml" ${EXCLUDE:+-k "not ($EXCLUDE)"} \
        --pyargs Products.MailHost "$ROOT/tests/mailhost/e2e_mailhost.py" "$@"
) || status=$?

"$VENV/bin/python" - "$WORK/results.xml" <<'PY'
import sys
import xml.etree.ElementTree as ET

try:
    suite = ET.parse(sys.argv[1]).getroot()
except (OSError, ET.ParseError):
    print("0 passed, 1 failed (no results: pytest did not run)")
    sys.exit()
suite = suite if suite.tag == "testsuite" else suite[0]
tests, failures, errors, skipped = (
    int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")
)
failed = failures + errors
print(f"{skipped} skipped")
print(f"{tests - failed - skipped} passed, {failed} failed")
PY
exit "$status"
