"""mailoutbox as a drop-in for zope.sendmail: creating queues, the names
zope.sendmail's users import, and its behaviours with old components."""
from __future__ import annotations

import io
import json
import logging
import os
import sys

import pytest
import transaction
import zope.event
from transaction.interfaces import ISavepointDataManager
from zope.interface import implementer
from zope.interface.verify import verifyClass
from zope.interface.verify import verifyObject

from mailoutbox import _commit as commit_mod
from mailoutbox import delivery as delivery_mod
from mailoutbox import queue as queue_mod
from mailoutbox._commit import roll_forward
from mailoutbox.cli import zope_sendmail
from mailoutbox.cli.zope_sendmail import ConsoleApp
from mailoutbox.delivery import DirectDataManager
from mailoutbox.delivery import DirectMailDelivery
from mailoutbox.delivery import MailDataManager
from mailoutbox.delivery import QueuedDataManager
from mailoutbox.delivery import QueuedMailDelivery
from mailoutbox.maildir import Maildir
from mailoutbox.mailer import SMTPMailer
from mailoutbox.queue import QueueProcessorThread


def mode(path):
    return os.stat(path).st_mode & 0o777


# -- Maildir(path, create=True) ------------------------------------------------

def test_create_missing_path(tmp_path):
    path = str(tmp_path / "queue")
    maildir = Maildir(path, create=True)
    assert maildir.created is True
    assert sorted(os.listdir(path)) == ["cur", "new", "tmp"]
    assert {mode(os.path.join(path, f)) for f in ("", "tmp", "new", "cur")} \
        == {0o700}
    # opening it again creates nothing
    assert Maildir(path, create=True).created is False
    assert Maildir(path).created is False


def test_create_in_empty_directory(tmp_path):
    """systemd's StateDirectory= makes the directory, empty."""
    path = tmp_path / "queue"
    path.mkdir(mode=0o755)
    maildir = Maildir(path, create=True)
    assert maildir.created is True
    assert sorted(os.listdir(path)) == ["cur", "new", "tmp"]
    assert mode(os.path.join(path, "new")) == 0o700


def test_create_completes_an_interrupted_creation(tmp_path):
    path = tmp_path / "queue"
    path.mkdir()
    (path / "tmp").mkdir()
    assert Maildir(path, create=True).created is True
    assert sorted(os.listdir(path)) == ["cur", "new", "tmp"]


def test_create_refuses_a_file(tmp_path):
    path = tmp_path / "queue"
    path.write_text("not a queue")
    with pytest.raises(ValueError, match=f"{path} is not a Maildir folder:"
                       " it is a file, not a mail queue"):
        Maildir(path, create=True)
    assert path.read_text() == "not a queue"


def test_create_under_a_file_raises_the_os_error(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(NotADirectoryError):
        Maildir(tmp_path / "file" / "queue", create=True)


@pytest.mark.parametrize("intruder", ["notes.txt", "new", "failed"])
def test_create_refuses_a_directory_with_other_things(tmp_path, intruder):
    path = tmp_path / "project"
    path.mkdir()
    (path / intruder).write_text("mine")  # a *file* named new/tmp too
    with pytest.raises(ValueError, match=f"{path} is not a Maildir folder: "
                       "it is not a mail queue and not empty"):
        Maildir(path, create=True)
    assert os.listdir(path) == [intruder]


def test_open_without_create_names_the_path(tmp_path):
    with pytest.raises(ValueError, match="missing is not a Maildir folder:"
                       " it is not a mail queue"):
        Maildir(tmp_path / "missing")
    assert not (tmp_path / "missing").exists()


# -- zope.sendmail's names -----------------------------------------------------

MESSAGE = b"From: a@example.org\r\nSubject: hello\r\n\r\nbody\r\n"


class Mailer:
    """A mailer that records what it is asked to do."""

    def __init__(self):
        self.calls = []

    def vote(self, fromaddr, toaddrs, message):
        self.calls.append("vote")

    def send(self, fromaddr, toaddrs, message):
        self.calls.append("send")

    def abort(self):
        self.calls.append("abort")


def test_names_zope_sendmail_users_import():
    from mailoutbox.delivery import AbstractMailDelivery
    from mailoutbox.delivery import MailDataManager
    from mailoutbox.delivery import QueueProcessorThread
    from mailoutbox.queue import ConsoleApp
    from mailoutbox.queue import run

    assert QueueProcessorThread is queue_mod.QueueProcessorThread
    assert issubclass(DirectMailDelivery, AbstractMailDelivery)
    assert issubclass(QueuedMailDelivery, AbstractMailDelivery)
    assert verifyClass(ISavepointDataManager, MailDataManager)
    assert ConsoleApp is zope_sendmail.ConsoleApp and run is zope_sendmail.run
    for module in (delivery_mod, queue_mod):
        with pytest.raises(AttributeError, match="no attribute 'nothing'"):
            module.nothing  # noqa: B018


def test_direct_create_data_manager(tm, events):
    mailer = Mailer()
    delivery = DirectMailDelivery(mailer, tm)
    datamanager = delivery.createDataManager("a@x.org", ["b@x.org"], MESSAGE)
    assert isinstance(datamanager, DirectDataManager)
    assert not tm.get()._resources  # not joined
    [message] = datamanager.messages
    assert b"Message-Id: <%s>" % message.message_id.encode() in message.data
    tm.get().join(datamanager)
    tm.commit()
    assert mailer.calls == ["vote", "send"]
    assert [e.messageId for e in events] == [message.message_id]


def test_queued_create_data_manager(queue_path, tm):
    delivery = QueuedMailDelivery(queue_path, tm)
    datamanager = delivery.createDataManager("a@x.org", ["b@x.org"], MESSAGE)
    assert isinstance(datamanager, QueuedDataManager)
    tm.get().join(datamanager)
    tm.commit()
    assert len(list(Maildir(queue_path))) == 1
    with pytest.raises(ValueError, match="invalid address"):
        delivery.createDataManager("a@x.org", ["not an address"], MESSAGE)


def test_mail_data_manager_commit(tm, caplog):
    calls = []
    datamanager = MailDataManager(
        lambda *args: calls.append(("finish", *args)), args=(1, 2),
        vote=lambda *args: calls.append(("vote", *args)),
        onAbort=lambda: calls.append(("abort",)))
    assert verifyObject(ISavepointDataManager, datamanager)
    assert datamanager.transaction_manager is transaction.manager
    assert isinstance(datamanager.sortKey(), str)
    assert "MailDataManager" in repr(datamanager)
    tm.get().join(datamanager)
    tm.savepoint().rollback()  # nothing to roll back
    tm.commit()
    assert calls == [("vote", 1, 2), ("finish", 1, 2)]
    datamanager.beforeCompletion(None)
    datamanager.afterCompletion(None)

    def broken():
        raise RuntimeError("cannot send")

    tm.get().join(MailDataManager(broken))  # no vote, no onAbort
    tm.commit()  # the failure is logged: the transaction committed
    assert any("failed in tpc_finish" in r.getMessage() and r.exc_info
               for r in caplog.records)


def test_mail_data_manager_abort(tm):
    calls = []
    tm.get().join(MailDataManager(lambda: calls.append("finish"),
                                  onAbort=lambda: calls.append("abort")))
    tm.abort()
    assert calls == ["abort"]
    tm.get().join(MailDataManager(lambda: calls.append("finish")))
    tm.abort()
    assert calls == ["abort"]


# -- old mailers -----------------------------------------------------------------

class OldMailer:
    """A mailer of zope.sendmail's early days: send() only."""

    def __init__(self):
        self.sent = []

    def send(self, fromaddr, toaddrs, message):
        self.sent.append(message)


class NoneMailer(OldMailer):
    vote = None
    abort = None


@pytest.mark.parametrize("kind", [OldMailer, NoneMailer])
def test_mailer_without_vote_and_abort_warns_and_sends(tm, events, kind):
    mailer = kind()
    delivery = DirectMailDelivery(mailer, tm)
    message_id = delivery.send("a@x.org", ["b@x.org"], MESSAGE)
    with pytest.warns(DeprecationWarning, match="has no vote"):
        tm.commit()
    assert len(mailer.sent) == 1
    assert [e.messageId for e in events] == [message_id]


def test_mailer_without_abort_when_another_resource_fails(tm, events):
    mailer = OldMailer()
    DirectMailDelivery(mailer, tm).send("a@x.org", ["b@x.org"], MESSAGE)

    def fail(txn):
        raise RuntimeError("the database cannot commit")

    tm.get().join(_Failing(tm))
    with pytest.warns(DeprecationWarning), \
            pytest.raises(RuntimeError, match="cannot commit"):
        tm.commit()
    tm.abort()
    assert mailer.sent == [] and events == []


@implementer(ISavepointDataManager)
class _Failing:
    """A resource whose vote fails (sorted after the deliveries)."""

    def __init__(self, tm):
        self.transaction_manager = tm

    def sortKey(self):
        return "~failing"

    def tpc_vote(self, txn):
        raise RuntimeError("the database cannot commit")

    def abort(self, txn):
        pass

    tpc_begin = commit = tpc_abort = tpc_finish = abort

    def savepoint(self):
        return transaction._transaction.NoRollbackSavepoint(self)


# -- another IMaildir for the processor -----------------------------------------

def test_processor_accepts_zope_sendmails_maildir(queue_path, smtp_server, tm):
    from zope.sendmail.maildir import Maildir as ZopeMaildir

    QueuedMailDelivery(queue_path, tm).send("a@x.org", ["b@x.org"], MESSAGE)
    tm.commit()
    processor = QueueProcessorThread()
    processor.setMailer(SMTPMailer(smtp_server.host, smtp_server.port,
                                   no_tls=True))
    processor.setMaildir(ZopeMaildir(queue_path))
    assert isinstance(processor.maildir, Maildir)
    assert processor.queuePath == queue_path
    try:
        assert processor.process_queue().sent == 1
    finally:
        processor.stop(timeout=10)
    assert len(smtp_server.messages) == 1
    ours = Maildir(queue_path)
    processor.setMaildir(ours)
    assert processor.maildir is ours


def test_processor_refuses_a_maildir_without_a_path():
    class Pathless:
        def __iter__(self):
            return iter([])

        def newMessage(self):
            raise NotImplementedError

    with pytest.raises(TypeError, match="has no path to open one at"):
        QueueProcessorThread().setMaildir(Pathless())


# -- abort hooks ---------------------------------------------------------------------

@pytest.mark.parametrize("hook", ["addAfterAbortHook", "addBeforeAbortHook"])
def test_send_while_aborting_raises(queue_path, tm, hook):
    delivery = QueuedMailDelivery(queue_path, tm)
    outcome = []

    def send():
        try:
            outcome.append(delivery.send("a@x.org", ["b@x.org"], MESSAGE))
        except ValueError as exc:
            outcome.append(exc)

    getattr(tm.get(), hook)(send)
    tm.abort()
    [error] = outcome
    assert isinstance(error, ValueError)
    assert "the transaction is being aborted" in str(error)
    assert "after abort() returned" in str(error)
    assert not os.path.exists(os.path.join(queue_path, "new"))


# -- events -----------------------------------------------------------------------

def test_subscriber_committing_again_gets_each_event_once(tm, events):
    mailer = Mailer()
    delivery = DirectMailDelivery(mailer, tm)
    seen = []

    def subscriber(event):
        seen.append(event.messageId)
        tm.commit()  # the completed transaction, again

    zope.event.subscribers.append(subscriber)
    try:
        ids = [delivery.send("a@x.org", ["b@x.org"], MESSAGE) for _ in range(2)]
        tm.commit()
    finally:
        zope.event.subscribers.remove(subscriber)
    assert seen == ids
    assert [e.messageId for e in events] == ids
    assert mailer.calls == ["vote", "send", "send"]


# -- zope-sendmail's console application -------------------------------------------

def test_console_app_options(queue_path):
    app = ConsoleApp(["zope-sendmail", queue_path])
    assert (app.script_name, app.queue_path, app.daemon, app.interval) \
        == ("zope-sendmail", queue_path, False, 3)
    assert (app.hostname, app.port, app.username, app.password) \
        == ("localhost", 25, None, None)
    assert not app.force_tls and not app.no_tls
    assert isinstance(app.mailer, SMTPMailer)
    app = ConsoleApp(["zope-sendmail", "--daemon", "--interval", "7",
                      "--hostname", "foo", "--port", "75", "--username",
                      "chris", "--password", "rossi", "--force-tls", queue_path],
                     verbose=False)
    assert (app.daemon, app.interval, app.hostname, app.port) \
        == (True, 7, "foo", 75)
    assert (app.username, app.password, app.force_tls) == ("chris", "rossi", True)
    assert app.settings.concurrency == queue_mod.DEFAULT_CONCURRENCY


def test_console_app_ini(tmp_path):
    ini = tmp_path / "zope-sendmail.ini"
    ini.write_text("[app:zope-sendmail]\ninterval = 33\nhostname = testhost\n"
                   "port = 2525\nusername = Chris\npassword = Rossi\n"
                   "force_tls = False\nno_tls = True\n"
                   "queue_path = hammer/dont/hurt/em\n")
    app = ConsoleApp(["zope-sendmail", "--config", str(ini)])
    assert (app.queue_path, app.interval, app.hostname, app.port) \
        == ("hammer/dont/hurt/em", 33, "testhost", 2525)
    assert (app.username, app.password, app.no_tls) == ("Chris", "Rossi", True)
    # unlike zope.sendmail, the command line wins
    app = ConsoleApp(["zope-sendmail", "--config", str(ini), "--port", "26",
                      str(tmp_path)])
    assert (app.queue_path, app.port) == (str(tmp_path), 26)


@pytest.mark.parametrize("argv, error", [
    ([], "please specify the queue path"),
    (["--username", "chris", "Q"], "a username and a password must be given"),
    (["--force-tls", "--no-tls", "Q"], "--no-tls: not allowed with argument"),
    (["Q", "another-one"], "unrecognized arguments"),
    (["--config", "/nonexistent.ini"], "cannot read the configuration file"),
])
def test_console_app_bad_options(capsys, argv, error):
    with pytest.raises(SystemExit) as info:
        ConsoleApp(["sendmail", *argv])
    assert info.value.code == 2
    assert error in capsys.readouterr().err


def test_console_app_help(capsys):
    with pytest.raises(SystemExit) as info:
        ConsoleApp(["prog", "--help"])
    assert info.value.code == 0
    assert capsys.readouterr().out.startswith("usage: prog ")


def test_console_app_sends_with_mailoutbox_run(queue_path, smtp_server, tm,
                                               capsys):
    QueuedMailDelivery(queue_path, tm).send("a@x.org", ["b@x.org"], MESSAGE)
    tm.commit()
    argv = ["zope-sendmail", "--hostname", smtp_server.host, "--port",
            str(smtp_server.port), "--no-tls", queue_path]
    assert zope_sendmail.run(argv) == 0
    assert len(smtp_server.messages) == 1
    assert "sent 1, deferred 0, failed 0" in capsys.readouterr().out


def test_console_app_with_other_kinds(queue_path):
    calls = []

    class Mailer:
        def __init__(self, *args):
            calls.append(("mailer", args))

    class Processor:
        def __init__(self, interval):
            calls.append(("processor", interval))

        def setMailer(self, mailer):
            calls.append(("setMailer", type(mailer).__name__))

        def setQueuePath(self, path):
            calls.append(("setQueuePath", path))

        def run(self, forever):
            calls.append(("run", forever))

    class App(ConsoleApp):
        QueueProcessorKind = Processor
        MailerKind = Mailer

    assert App(["zs", "--interval", "2", queue_path]).main() == 0
    assert calls == [
        ("mailer", ("localhost", 25, None, None, False, False)),
        ("processor", 2.0), ("setMailer", "Mailer"),
        ("setQueuePath", queue_path), ("run", False),
    ]


# -- commit records (mailoutbox._commit) ------------------------------------------

def record_files(maildir, prefix="."):
    return [n for n in os.listdir(maildir.tmp) if n.startswith(prefix)]


def write_record(maildir, files, name=".committed-test"):
    path = os.path.join(maildir.tmp, name)
    with open(path, "w") as f:
        f.write(files if isinstance(files, str) else json.dumps({"files": files}))
    return path


def put_in_tmp(maildir, name):
    with open(os.path.join(maildir.tmp, name), "wb") as f:
        f.write(b"X-Zope-From: a@x.org\nX-Zope-To: b@x.org\n\n" + MESSAGE)


def test_roll_forward(queue_path, caplog):
    maildir = Maildir(queue_path, create=True)
    put_in_tmp(maildir, "1.a")
    write_record(maildir, [["tmp/1.a", "new/1.a", "a@x"],
                           ["tmp/1.b", "new/1.b", "b@x"]])  # 1.b moved already
    assert roll_forward(maildir) == 1
    assert os.listdir(maildir.new) == ["1.a"] and os.listdir(maildir.tmp) == []
    assert any("queued message a@x as" in r.getMessage() for r in caplog.records)
    assert roll_forward(maildir) == 0


@pytest.mark.parametrize("files", [
    [["tmp/../../x", "new/x", "a@x"]],
    [["../tmp/x", "../new/x", "a@x"]],
    [["/abs/tmp/x", "/abs/new/x", "a@x"]],
    [["tmp/x", "new/y", "a@x"]],
    [["tmp/x", "cur/x", "a@x"]],
    [["cur/x", "new/x", "a@x"]],
    [["tmp/.pending-x", "new/.pending-x", "a@x"]],
    [["relays/a/tmp/x", "relays/b/new/x", "a@x"]],
    "not json",
    [["tmp/x", "new/x"]],
])
def test_roll_forward_refuses_a_bad_record(queue_path, caplog, files):
    maildir = Maildir(queue_path, create=True)
    put_in_tmp(maildir, "x")
    record = write_record(maildir, files)
    assert roll_forward(maildir) == 0
    assert os.path.exists(record)  # left for the 36-hour clean-up
    assert os.listdir(maildir.new) == []
    assert any("could not roll the commit record" in r.getMessage()
               and r.exc_info for r in caplog.records)


def test_roll_forward_relay_files_and_vanished_records(queue_path):
    maildir = Maildir(queue_path, create=True)
    os.mkdir(os.path.join(queue_path, "relays"))
    relay = Maildir(os.path.join(queue_path, "relays", "crm"), create=True)
    put_in_tmp(relay, "r")
    write_record(maildir, [["relays/crm/tmp/r", "relays/crm/new/r", "r@x"]])
    # a record whose transaction finished between the listing and the reading
    os.symlink(os.path.join(maildir.tmp, "gone"),
               os.path.join(maildir.tmp, ".committed-gone"))
    assert roll_forward(maildir) == 1
    assert os.listdir(relay.new) == ["r"]
    assert record_files(maildir) == [".committed-gone"]


def test_roll_forward_without_a_queue(tmp_path, caplog):
    maildir = Maildir(tmp_path / "q", create=True)
    os.rmdir(maildir.tmp)
    assert roll_forward(maildir) == 0
    with open(maildir.tmp, "w"):  # a file where tmp/ should be
        pass
    assert roll_forward(maildir) == 0
    assert any("could not list" in r.getMessage() for r in caplog.records)


def test_commit_record_that_cannot_be_written_leaves_nothing(queue_path, tm):
    delivery = QueuedMailDelivery(queue_path, tm, mailers=["crm"])
    delivery.send("a@x.org", ["b@x.org"], MESSAGE)
    ids = [delivery.send("a@x.org", ["b@x.org"], MESSAGE, mailer="crm")]
    relay_tmp = delivery.maildir("crm").tmp

    def remove_relay_tmp(maildir, *args):
        # the relay's tmp/ disappears before the record's fsyncs
        for name in os.listdir(relay_tmp):
            os.unlink(os.path.join(relay_tmp, name))
        os.rmdir(relay_tmp)
        return real_init(maildir, *args)

    real_init = commit_mod.CommitRecord.__init__
    commit_mod.CommitRecord.__init__ = remove_relay_tmp
    try:
        with pytest.raises(OSError, match=f"could not queue messages <.*{ids[0]}"):
            tm.commit()
    finally:
        commit_mod.CommitRecord.__init__ = real_init
    tm.abort()
    assert os.listdir(os.path.join(queue_path, "tmp")) == []
    assert list(Maildir(queue_path)) == []


def test_commit_record_lost_before_finish(queue_path, tm, caplog):
    """The pending record vanished: the messages are queued all the same."""
    delivery = QueuedMailDelivery(queue_path, tm)
    for _ in range(2):
        delivery.send("a@x.org", ["b@x.org"], MESSAGE)
    tmp = os.path.join(queue_path, "tmp")
    tm.get().join(Hook(tm, on_vote=lambda: [
        os.unlink(os.path.join(tmp, n)) for n in os.listdir(tmp)
        if n.startswith(".pending-")]))
    tm.commit()
    assert len(list(Maildir(queue_path))) == 2
    assert os.listdir(tmp) == []
    assert any("could not commit the record" in r.getMessage()
               for r in caplog.records)


def test_finish_after_a_processor_rolled_forward(queue_path, tm, caplog):
    """A processor's roll_forward() moved a file first: no alarm."""
    delivery = QueuedMailDelivery(queue_path, tm)
    for _ in range(2):
        delivery.send("a@x.org", ["b@x.org"], MESSAGE)
    tmp = os.path.join(queue_path, "tmp")

    def move_one():
        name = sorted(n for n in os.listdir(tmp) if not n.startswith("."))[0]
        os.rename(os.path.join(tmp, name), os.path.join(queue_path, "new", name))

    tm.get().join(Hook(tm, on_vote=move_one))
    caplog.set_level(logging.INFO, "mailoutbox")
    tm.commit()
    assert len(list(Maildir(queue_path))) == 2
    assert os.listdir(tmp) == []
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_rename_failing_in_finish_keeps_the_committed_record(queue_path, tm,
                                                             caplog):
    delivery = QueuedMailDelivery(queue_path, tm)
    for _ in range(2):
        delivery.send("a@x.org", ["b@x.org"], MESSAGE)
    tmp = os.path.join(queue_path, "tmp")

    def block_one():  # a directory in new/ where a message should go
        name = sorted(n for n in os.listdir(tmp) if not n.startswith("."))[0]
        os.mkdir(os.path.join(queue_path, "new", name))
        os.mkdir(os.path.join(queue_path, "new", name, "x"))

    tm.get().join(Hook(tm, on_vote=block_one))
    tm.commit()
    assert any("the queue processor will try again" in r.getMessage()
               for r in caplog.records)
    maildir = Maildir(queue_path)
    assert len(record_files(maildir, ".committed-")) == 1
    blocked = next(n for n in os.listdir(maildir.new)
               if os.path.isdir(os.path.join(maildir.new, n)))
    os.rmdir(os.path.join(maildir.new, blocked, "x"))
    os.rmdir(os.path.join(maildir.new, blocked))
    assert roll_forward(maildir) == 1
    assert len(list(maildir)) == 2 and os.listdir(tmp) == []


@implementer(ISavepointDataManager)
class Hook(_Failing):
    """A resource sorted after the deliveries that runs *on_vote*."""

    def __init__(self, tm, on_vote):
        self.transaction_manager = tm
        self.on_vote = on_vote

    def tpc_vote(self, txn):
        self.on_vote()


@pytest.mark.parametrize("text", [True, False])
def test_console_app_ini_from_stdin(monkeypatch, text):
    ini = "[app:zope-sendmail]\nport = 2525\nqueue_path = q\n"
    if text:  # a text stream without a buffer, as zope.sendmail's tests use
        monkeypatch.setattr(sys, "stdin", io.StringIO(ini))
    else:
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(ini.encode())))
    app = ConsoleApp(["sendmail", "--config", "-"])
    assert (app.port, app.queue_path) == (2525, "q")
