"""mailoutbox demo: the main job, with no configuration."""
from __future__ import annotations

import os
import re
import shutil
import sys
import tempfile

from mailoutbox.cli import EXIT_ERROR
from mailoutbox.cli import EXIT_OK

from .test_cli import cli
from .test_cli import python_m


def demo_dirs() -> set[str]:
    return {n for n in os.listdir(tempfile.gettempdir())
            if n.startswith("mailoutbox-demo-")}


def check_output(out: str) -> None:
    lines = out.splitlines()
    port = re.search(r"127\.0\.0\.1:(\d+)", lines[0]).group(1)
    assert lines[0].endswith(f"an SMTP server on 127.0.0.1:{port}, which"
                             " refuses nobody@example.net.")
    text = "\n".join(lines[1:])
    assert text == f"""
1. Three messages queued in one transaction, which commits:
   queued <order-1@shop.example.org> for Alice <alice@example.org>
   queued <report-2@shop.example.org> for bob@example.org, nobody@example.net
   queued <hello-3@shop.example.org> for nobody@example.net
   The queue holds: 3 queued, 0 deferred, 0 sending, 0 failed

2. A message sent in a transaction that aborts:
   send() returned <never-4@shop.example.org>, then the transaction aborted; \
nothing was queued:
   The queue holds: 3 queued, 0 deferred, 0 sending, 0 failed

3. The queue processor sends the queue; the events it notifies:
   sent     <order-1@shop.example.org>
   sent     <report-2@shop.example.org>; refused: nobody@example.net (550 5.1.1 \
No such user)
   failed   <hello-3@shop.example.org>: all recipients refused \
(nobody@example.net: 550)
   sent 2, deferred 0, failed 1
   The queue holds: 0 queued, 0 deferred, 0 sending, 2 failed

4. What the SMTP server on 127.0.0.1:{port} received:
   from shop@example.org to alice@example.org: 'Your order has shipped' \
<order-1@shop.example.org>
   from shop@example.org to bob@example.org: 'Weekly report' \
<report-2@shop.example.org>"""


def test_demo():
    before = demo_dirs()
    result = cli("demo")
    assert result.code == EXIT_OK, result.err
    check_output(result.out)
    assert result.err == ""
    assert demo_dirs() == before  # cleaned up


def test_demo_keep_leaves_the_queue_to_look_at():
    result = cli("demo", "--keep")
    assert result.code == EXIT_OK
    last = result.out.splitlines()[-1]
    assert last.startswith("The queue is kept: mailoutbox list --all ")
    queue = last.rsplit(" ", 1)[1]
    try:
        listing = cli("list", "--all", queue)
        assert "failed" in listing.out and "'Hello, is anybody there?'" in (
            listing.out
        )
    finally:
        shutil.rmtree(os.path.dirname(queue))


def test_demo_without_aiosmtpd_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "aiosmtpd", None)  # import fails
    result = cli("demo")
    assert result.code == EXIT_ERROR
    assert result.err == (
        "mailoutbox: error: the demo needs aiosmtpd, which is not installed:"
        " pip install aiosmtpd  (or: pip install 'mailoutbox[server]')\n"
    )


def test_demo_as_a_process():
    done = python_m("demo")
    assert done.returncode == EXIT_OK, done.stderr
    check_output(done.stdout.decode())
    assert done.stderr == b""
