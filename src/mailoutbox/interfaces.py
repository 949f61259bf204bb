"""The contracts of mailoutbox.

How mail leaves an application:

- The application looks up an :class:`IMailDelivery` utility and calls its
  ``send()`` inside a transaction.  It gets back the message's Message-Id, which
  it can use to follow the message through :class:`IMailEvent` events.

- The delivery joins the transaction as a data manager.  If the transaction
  aborts, nothing is sent and nothing is left on disk.  If it commits, the
  message is either sent at once (:class:`IDirectMailDelivery`) or written
  durably into a Maildir queue (:class:`IQueuedMailDelivery`).

- An :class:`IMailQueueProcessor` (a thread in the application, or the
  ``mailoutbox run`` command) drains the queue through an :class:`IMailer`
  and reports every outcome as an :class:`IMailSentEvent` or
  :class:`IMailErrorEvent` through ``zope.event``.

The names and attributes of the original zope.sendmail interfaces are kept, so
code written against ``zope.sendmail.interfaces`` works after an import rename.
What mailoutbox adds is marked ``.. versionadded:: 0.1``.

The exceptions raised by mailers are defined in :mod:`mailoutbox.errors`.
"""
from __future__ import annotations

from zope.interface import Attribute
from zope.interface import Interface
from zope.schema import Bool
from zope.schema import Dict
from zope.schema import Float
from zope.schema import Int
from zope.schema import Password
from zope.schema import TextLine

__all__ = [
    "IDirectMailDelivery",
    "IMailDelivery",
    "IMailErrorEvent",
    "IMailEvent",
    "IMailQueueProcessor",
    "IMailSentEvent",
    "IMaildir",
    "IMaildirFactory",
    "IMaildirMessageWriter",
    "IMailer",
    "IQueueClaim",
    "IQueueEntry",
    "IQueueStore",
    "IQueuedMailDelivery",
    "ISMTPMailer",
    "ISendmailMailer",
]


class IMailDelivery(Interface):
    """A utility that sends mail as part of a transaction."""

    def send(fromaddr, toaddrs, message, mailer=None, *, not_before=None,
             priority=None):
        """Send *message* from *fromaddr* to every address in *toaddrs*.

        *fromaddr* is the envelope sender, a ``str``.  *toaddrs* is a
        sequence (not a single string) of one or more envelope recipients.
        Each address is either a bare addr-spec (``jane@example.org``) or an
        address with a display name (``"Doe, Jane" <jane@example.org>``); only
        the addr-spec is used in the SMTP envelope.

        *message* is the whole message, headers and body, as ``bytes``, as
        ``str`` (encoded as UTF-8) or as an :class:`email.message.Message`.
        It must have a blank line between headers and body (a message with
        headers only must end with one).

        If the message has no ``Message-Id`` header, a globally unique one is
        generated and added; an existing one is kept.  Returns the Message-Id
        without its angle brackets.

        The message is sent (or queued) only if the current transaction of
        the delivery's transaction manager commits.

        *mailer*, if given, is the name of the mailer (the relay) that sends
        this message instead of the delivery's default one.  Only names
        configured on the delivery are accepted; nothing in the message can
        choose or change the mailer.  A queued delivery keeps routed
        messages in a folder of their own inside the queue, where a
        zope.sendmail processor never looks (see the documentation chapter
        "Routing").

        *not_before*, if given, is the earliest time the message may be
        sent: a timezone-aware :class:`~datetime.datetime`, a
        :class:`~datetime.timedelta` from now, or seconds since the epoch (a
        naive datetime is refused).  A queued delivery keeps the message
        back until then (``mailoutbox list`` shows it as scheduled;
        ``mailoutbox run --flush`` does not send it early); a direct
        delivery cannot wait and refuses a time still to come.  *priority*
        is ``"low"``, ``"normal"`` (the default), ``"high"`` or a number
        from -100 to 100 (those names are -10, 0 and 10): a queue
        processor sends the due messages of higher priority first, and those
        of one priority oldest first; a direct delivery ignores it.  A
        zope.sendmail processor draining the queue ignores both (it sends
        every message at once).  See :mod:`mailoutbox.schedule`.

        Raises :class:`ValueError` or :class:`TypeError`, with nothing joined
        to the transaction and nothing written, when: *toaddrs* is empty or is
        a single string; any address contains NUL, or a CR or LF that is not
        folding white space (which is unfolded), or is not a valid address;
        the message has no header/body separation, or a header line that
        would be read differently on the wire, or (a ``Message``) header
        fields other than its headers once serialized; the existing
        ``Message-Id`` header is malformed; *mailer* is not a name the
        delivery was configured to route to; *not_before* or *priority* is
        not one of the values above.

        .. versionadded:: 0.1
           The *mailer*, *not_before* and *priority* arguments.
        """

    def send_message(message, fromaddr=None, toaddrs=None, mailer=None, *,
                     not_before=None, priority=None):
        """Send the :class:`email.message.Message` *message* (``bytes`` and
        ``str`` are taken too, as by :meth:`send`), to the recipients its
        headers name, as mail clients and ``sendmail -t`` do.

        Without *fromaddr*, the envelope sender is the address of the
        ``Sender`` header, or else of the ``From`` header; it must be exactly
        one address.  Without *toaddrs*, the recipients are the addresses of
        the ``To``, ``Cc`` and ``Bcc`` headers, each once.  When the message
        has ``Resent-`` headers, the newest block of them is used instead:
        ``Resent-Sender`` (or ``Resent-From``), and ``Resent-To``,
        ``Resent-Cc`` and ``Resent-Bcc``.  Only the addr-specs are used.

        The ``Bcc`` and ``Resent-Bcc`` headers are removed from what is sent
        or queued, whoever gave the recipients; *message* itself is not
        changed.  Then the message is sent as by :meth:`send` (with the same
        checks, Message-Id and transaction), through *mailer* if given,
        with *not_before* and *priority* as :meth:`send` takes them.
        Returns the Message-Id without its angle brackets.

        Raises :class:`ValueError`, with nothing joined to the transaction,
        when the headers name no sender or no recipient, when the sender's
        header names several addresses, when an address header cannot be
        parsed, and for the reasons :meth:`send` gives.

        .. versionadded:: 0.1
        """


class IDirectMailDelivery(IMailDelivery):
    """A delivery that sends messages synchronously when the transaction
    commits.

    The SMTP connection is opened and verified when the transaction votes
    (``tpc_vote``), so an unreachable server aborts the transaction.  The
    messages are sent in ``tpc_finish``; a failure there is logged and
    reported as an :class:`IMailErrorEvent`, never raised.  Events are
    dispatched after the transaction has completed.
    """

    mailer = Attribute("The IMailer used to send the messages.")

    mailers = Attribute(
        "A mapping of the names accepted by send(..., mailer=NAME) to the"
        " IMailers that send the messages routed to them."
        "\n\n.. versionadded:: 0.1"
    )


class IQueuedMailDelivery(IMailDelivery):
    """A delivery that writes messages into a Maildir queue.

    When ``commit()`` of the transaction returns, the message is on disk and
    survives a crash or a power loss.  A separate :class:`IMailQueueProcessor`
    sends it.

    .. versionadded:: 0.1
       The queue may be a PostgreSQL table, named by a ``postgresql://``
       URL (an :class:`IQueueStore`): the row is written through the
       application's own connection (the delivery's ``connection``
       callable) or through the delivery's own, committed with the
       transaction.
    """

    queuePath = TextLine(
        title="Queue path",
        description="Path of the Maildir directory used to queue mail, or"
        " the postgresql:// URL of a PostgreSQL queue.",
    )

    mailer_names = Attribute(
        "The names accepted by send(..., mailer=NAME): messages routed to"
        " one of them are queued in its relay folder, for the processor to"
        " send through the mailer of that name.\n\n.. versionadded:: 0.1"
    )


class IMailQueueProcessor(Interface):
    """Delivers the messages of a queue asynchronously."""

    queuePath = TextLine(
        title="Queue path",
        description="Path of the Maildir directory used to queue mail.",
    )

    pollingInterval = Int(
        title="Polling interval",
        description="How often the queue is checked for new messages"
        " (in milliseconds).",
        default=3000,
    )

    mailer = Attribute("The IMailer used to send the messages.")

    mailers = Attribute(
        "A mapping of names to the IMailers that send the messages of the"
        " relay folders of those names; a relay folder without one uses the"
        " IMailer utility of its name, and its messages are deferred while"
        " there is none.\n\n.. versionadded:: 0.1"
    )

    metrics = Attribute(
        "The processor's numbers (a mailoutbox.metrics.Metrics): messages by"
        " state, sent/deferred/failed counters, send and time-in-queue"
        " histograms, health; see mailoutbox.metrics.register() to expose"
        " them to Prometheus.\n\n.. versionadded:: 0.1"
    )

    rate = Attribute(
        "The rate limit, in messages per second, of the relays whose mailer"
        " sets none (None: unlimited).\n\n.. versionadded:: 0.1"
    )

    max_connections = Attribute(
        "The largest number of connections to each relay whose mailer sets"
        " none (None: the concurrency).\n\n.. versionadded:: 0.1"
    )

    def process_queue(now=None, on_progress=None, *, flush=False):
        """Make one pass over the queue and its relay folders and return
        what it did (a mailoutbox.workers.Stats).  With *flush*, every
        deferred message is due, whatever the time of its next attempt,
        except those scheduled for later (``send(..., not_before=...)``).

        .. versionadded:: 0.1
        """

    def wake(relays=None):
        """Start a pass of the queue (or of the relay folders named in
        *relays*) now, instead of at the next interval; callable from any
        thread.  Committed messages wake the processors of their queue by
        themselves.

        .. versionadded:: 0.1
        """

    def stop(timeout=None):
        """Stop after the messages in flight; raise TimeoutError if that
        takes longer than *timeout* seconds.

        .. versionadded:: 0.1
        """


class IMailer(Interface):
    """Sends a message synchronously."""

    def send(fromaddr, toaddrs, message):
        """Send *message* (``bytes``, headers and body) now.

        *fromaddr* is the envelope sender and *toaddrs* a sequence of
        envelope recipients; either may carry display names, which are
        dropped from the envelope.

        Returns a mapping of the recipients the server refused while it
        accepted the message for others, ``{address: (code, text)}``; it is
        empty when every recipient was accepted.  (zope.sendmail's mailers
        return ``None``; callers treat ``None`` as "no refusals".)

        Raises a :class:`mailoutbox.errors.MailError` when the message was
        not accepted for any recipient: a
        :class:`~mailoutbox.errors.TransientMailError` when trying again
        later may succeed (4xx replies, connection problems, timeouts), a
        :class:`~mailoutbox.errors.PermanentMailError` when it will not (5xx
        replies, every recipient refused permanently).

        .. versionchanged:: 0.1
           Returns the refused recipients and raises classified errors.
        """

    def vote(fromaddr, toaddrs, message):
        """Raise an exception if there is a known reason why the message
        cannot be sent, e.g. the server cannot be reached.

        An SMTP mailer opens and verifies its connection here; the following
        ``send()`` uses it.
        """

    def abort():
        """Forget about the message whose ``vote()`` succeeded, closing any
        connection opened for it."""


class ISMTPMailer(IMailer):
    """A mailer that hands messages to a relay host over SMTP.

    One mailer may be shared by any number of threads (the queue
    processor's workers, request threads sending directly): each thread has
    its own connection, which no other thread writes to or closes while it
    is in use.

    Errors (see :mod:`mailoutbox.errors`) about the connection, TLS and the
    configuration name the server as ``host:port``.  Replies that are about
    the sender's configuration rather than the message (TLS required,
    authentication required or failed) are transient
    :class:`~mailoutbox.errors.MailConfigurationError` s, so that queued
    messages wait until the configuration is fixed.
    """

    hostname = TextLine(
        title="Hostname",
        description="Name of the SMTP server.",
        default="localhost",
    )

    port = Int(
        title="Port",
        description="Port of the SMTP service, from 1 to 65535 (checked when"
        " the mailer is made: ValueError).",
        default=25,
        min=1,
        max=65535,
    )

    username = TextLine(
        title="Username",
        description="Username used for optional SMTP authentication.",
        required=False,
    )

    password = Password(
        title="Password",
        description="Password used for optional SMTP authentication."
        " Never logged or shown.",
        required=False,
    )

    no_tls = Bool(
        title="No TLS",
        description="Never use TLS, even when the server offers STARTTLS.",
        default=False,
    )

    force_tls = Bool(
        title="Force TLS",
        description="Refuse to send a message unless the connection is"
        " encrypted.",
        default=False,
    )

    implicit_tls = Bool(
        title="Implicit TLS",
        description="Speak TLS from the first byte of the connection"
        " (SMTPS, usually port 465). no_tls and force_tls do not apply.",
        default=False,
    )

    timeout = Float(
        title="Timeout",
        description="Timeout in seconds for each step of an SMTP session as a"
        " whole: connecting, the TLS handshake, sending each command, and"
        " each reply however slowly its lines come (a server that trickles"
        " a reply for ever fails the attempt, transiently, after the"
        " timeout).  The message data must be sent within the timeout once"
        " for every 256 KiB (at least once: with 10 s, the server must read"
        " 25.6 KiB a second), and the reply to it must come within the"
        " timeout after that allowance at the latest.  A positive, finite"
        " number (checked when the mailer is made: ValueError), or None"
        " for no limit at all (not recommended: a silent server then holds"
        " a worker for ever).\n\n.. versionchanged:: 0.1\n"
        "   A deadline for each reply and for the data, not for each read.",
        required=False,
        default=10.0,
    )

    ca_file = TextLine(
        title="CA file",
        description="A PEM file of certificate authorities trusted for the"
        " server's certificate, for private relays. The system's"
        " authorities are used when it is not set.  Certificates and host"
        " names are always verified unless an ssl_context that does not"
        " verify them is given.\n\n.. versionadded:: 0.1",
        required=False,
    )

    rate = Float(
        title="Rate",
        description="The most messages per second that queue processors"
        " send through this relay (a token bucket allowing a burst of a"
        " tenth of a second's worth, at least one message), or None for no"
        " limit (the processor's own rate applies, if it has one).  Each"
        " processor keeps it on its own; direct deliveries ignore it.  A"
        " positive, finite number (checked: ValueError).  A relay that"
        " answers with a throttling reply is slowed down below it for a"
        " while (see mailoutbox.ratelimit).\n\n.. versionadded:: 0.1",
        required=False,
        default=None,
    )

    max_connections = Int(
        title="Maximum connections",
        description="The most connections a queue processor opens to this"
        " relay at once (it then uses no more worker threads for it than"
        " that, whatever its concurrency), or None for the processor's own"
        " limit.  A whole number of at least 1 (checked: ValueError)."
        "\n\n.. versionadded:: 0.1",
        required=False,
        default=None,
        min=1,
    )

    ssl_context = Attribute(
        "The ssl.SSLContext used for STARTTLS and implicit TLS."
        "\n\n.. versionadded:: 0.1"
    )

    def close_connection():
        """Close the calling thread's connection, if it has one: say QUIT
        (ignoring any failure) and forget it.  The next message of this
        thread opens a new one.

        A worker thread calls this when it is done, rather than
        :meth:`close`, which concerns every thread sharing the mailer.

        .. versionadded:: 0.1
        """

    def close():
        """Close the connections this mailer keeps open for reuse, those
        of every thread: the idle ones at once (with QUIT), the ones in use
        by their threads as soon as the message being sent is done.  Safe
        to call from any thread at any time; the mailer stays usable (the
        next message opens a new connection).  The connections still open
        when the mailer is garbage-collected, or at interpreter exit, are
        closed the same way.

        .. versionadded:: 0.1
        """


class ISendmailMailer(IMailer):
    """A mailer that hands messages to a local sendmail-compatible program.

    The program is called as ``PROGRAM -i -f FROM -- RCPT...`` with the
    message on its standard input.  A non-zero exit status is an error;
    ``EX_TEMPFAIL`` (75) and other "try again" statuses are transient.

    .. versionadded:: 0.1
    """

    command = TextLine(
        title="Command",
        description="Path of the sendmail-compatible program.",
        default="/usr/sbin/sendmail",
    )


class IMailEvent(Interface):
    """Something happened to a message."""

    messageId = TextLine(
        title="Message Id",
        description="The Message-Id of the message, without angle brackets.",
    )


class IMailSentEvent(IMailEvent):
    """The message was accepted by the server for at least one recipient.

    Its three attributes split the recipients of the attempt: the server
    accepted the message for those in :attr:`sent`, refused it for good to
    those in :attr:`refused`, and refused it for now to those in
    :attr:`deferred`, for whom the message stays queued.  The recipients
    already accepted are never sent the message again by the queue, except
    after a crash in the microseconds between the server's reply and the
    queue's bookkeeping (see "The queue on disk").
    """

    refused = Dict(
        title="Refused recipients",
        description="The recipients the server refused, for good, although"
        " it accepted the message for others, as {address: (code, text)}:"
        " refused with a 5xx reply (the queue keeps them in a part of the"
        " message in its failed area), or refused with any reply by a"
        " direct delivery, which never tries again."
        "\n\n.. versionadded:: 0.1\n.. versionchanged:: 0.1"
        "\n   Recipients refused with 4xx by the queue are in"
        " :attr:`deferred` instead.",
        required=False,
    )

    sent = Attribute(
        "The recipients the server accepted the message for, in this"
        " attempt: a tuple of the addresses as they were queued (with"
        " display names, if any).\n\n.. versionadded:: 0.1"
    )

    deferred = Dict(
        title="Deferred recipients",
        description="The recipients the server refused with a transient"
        " (4xx) reply, as {address: (code, text)}: the message stays queued"
        " for them alone, and is tried again with back-off until they are"
        " accepted, refused with 5xx or the message expires.  Always empty"
        " for a direct delivery.\n\n.. versionadded:: 0.1",
        required=False,
    )


class IMailErrorEvent(IMailEvent):
    """The message could not be sent (now, or ever)."""

    errorMessage = TextLine(
        title="Error message",
        description="A description of the error, with the SMTP code and"
        " text when there was a reply.",
    )

    permanent = Bool(
        title="Permanent",
        description="True when the message will not be tried again (it was"
        " moved to the failed area, or was sent directly); False when it"
        " stays queued and will be retried.\n\n.. versionadded:: 0.1",
        default=False,
    )

    code = Int(
        title="SMTP code",
        description="The SMTP reply code, if the failure was a reply."
        "\n\n.. versionadded:: 0.1",
        required=False,
    )

    refused = Dict(
        title="Refused recipients",
        description="The recipients refused by the server for good, as"
        " {address: (code, text)}: with a 5xx reply, or with any reply when"
        " the message will not be tried again."
        "\n\n.. versionadded:: 0.1",
        required=False,
    )

    deferred = Dict(
        title="Deferred recipients",
        description="The recipients the server refused with a transient"
        " (4xx) reply, as {address: (code, text)}, for whom the message"
        " stays queued (only when :attr:`permanent` is false).  When every"
        " recipient was refused, some with 4xx and others with 5xx, the"
        " message is kept for the first and the others are in"
        " :attr:`refused`.\n\n.. versionadded:: 0.1",
        required=False,
    )


class IMaildirFactory(Interface):
    """Opens Maildir folders."""

    def __call__(dirname, create=False):
        """Open the Maildir folder at path *dirname*.

        With *create* true, the folder (and its ``tmp``, ``new`` and ``cur``
        subdirectories) is created with mode 0700 when it does not exist.
        Otherwise, or when *dirname* exists but is not a Maildir folder,
        :class:`ValueError` is raised.
        """


class IMaildir(Interface):
    """Read and write access to a Maildir folder used as a mail queue.

    The layout and every state a message file can be in are described in the
    documentation chapter "The queue on disk".
    """

    path = TextLine(title="Path", description="Path of the folder.")

    def __iter__():
        """Iterate over the paths of the queued messages, oldest first
        (mailoutbox: in the order they are sent, higher priority first).

        Files whose names start with a dot are skipped, as the Maildir
        specification asks of readers.
        """

    def newMessage():
        """Start a new message in ``tmp/`` and return an
        :class:`IMaildirMessageWriter` for it."""


class IMaildirMessageWriter(Interface):
    """A file-like object for a new message in a Maildir."""

    def write(data):
        """Write *data* (``bytes``, or ``str`` encoded as UTF-8)."""

    def writelines(lines):
        """Write each item of the iterable *lines*; no separators are added."""

    def close():
        """Close the file.  May be called more than once."""

    def commit():
        """Deliver the message into ``new/``, durably.

        The data is flushed and fsynced, the file closed and renamed from
        ``tmp/`` into ``new/``, and ``new/`` is fsynced: when ``commit()``
        returns the message survives a crash or power loss.  Calling it
        again does nothing; calling it after ``abort()`` raises
        :class:`RuntimeError`.
        """

    def abort():
        """Close and remove the file from ``tmp/``.  Calling it again, or
        after ``commit()``, does nothing."""


class IQueueEntry(Interface):
    """One message of a queue store, as a listing found it.

    Entries are values: two listings give equal entries for the same
    message in the same place.

    .. versionadded:: 0.1
    """

    name = TextLine(
        title="Name",
        description="The message's id in its store, opaque to callers: a"
        " file name in a Maildir queue, a row id in a PostgreSQL queue.  It"
        " is what ``mailoutbox list`` shows and ``show``, ``retry`` and"
        " ``purge`` accept.",
    )

    folder = TextLine(
        title="Area",
        description="Where the message is: the store's queue area, or its"
        " failed area (compare with the store's ``failed``).",
    )

    regular = Bool(
        title="Regular",
        description="False for what cannot be a message (a directory or a"
        " symbolic link in a Maildir): the processor moves it to the failed"
        " area unclaimed.",
    )


class IQueueClaim(Interface):
    """A processor's exclusive hold on one queued message.

    Exactly one of :meth:`complete`, :meth:`defer`, :meth:`fail` or
    :meth:`release` ends it.  The hold lasts the lease given to
    :meth:`IQueueStore.claim`; :meth:`renew` extends it.  A processor that
    dies loses its claims when their lease runs out.

    .. versionadded:: 0.1
    """

    entry = Attribute("The IQueueEntry claimed.")

    def read():
        """The message as a queue file (bytes): the envelope lines
        (``X-Actually-From``/``X-Actually-To``, see
        :func:`mailoutbox.envelope.format_envelope`) then the message."""

    def renew():
        """Extend the lease from now.  Never waits on the network for
        long; a claim already gone is ignored."""

    def retry_state():
        """The message's retry state (a dict, see
        :func:`mailoutbox.retry.record_failure`), or None if it was never
        deferred."""

    def release():
        """Give the message back untouched (due again at once)."""

    def complete():
        """The message was sent: remove it and its state."""

    def defer(retry_at, state):
        """Keep the message queued until *retry_at* (seconds since the
        epoch), with the retry *state* (a JSON-able dict)."""

    def rewrite(data):
        """Replace the message (a queue file, as :meth:`read` returns) with
        *data*, atomically and durably; used to drop the recipients that
        already have it."""

    def split_failed(data, reason):
        """Put *data* (a queue file for some of the recipients) in the
        failed area with *reason* (a JSON-able dict); the claimed message
        stays queued.  Returns the new IQueueEntry."""

    def fail(reason):
        """Move the message to the failed area with *reason* (a JSON-able
        dict); return its IQueueEntry there."""


class IQueueStore(Interface):
    """Where queued messages wait: one queue (a *lane*, drained through
    one mailer) and, through :meth:`relay`, the lanes of its relays.

    The deliveries, the processor and the ``mailoutbox`` commands use a
    queue through this contract only; :mod:`mailoutbox.stores` opens the
    right store for a path (:class:`~mailoutbox.maildir.Maildir`) or a
    ``postgresql://`` URL (:mod:`mailoutbox.postgresql`).

    .. versionadded:: 0.1
    """

    path = TextLine(
        title="Path",
        description="The queue's path or URL, as given (a URL without its"
        " password); used in messages for people.",
    )

    key = TextLine(
        title="Key",
        description="Equal for every store object of the same queue in"
        " this process (a real path, a normalised URL): a commit wakes the"
        " processors serving the key.",
    )

    failed = TextLine(
        title="Failed area",
        description="The ``folder`` of the entries in the failed area.",
    )

    def scan():
        """List the lane once: a :class:`mailoutbox.maildir.Scan` whose
        ``entries`` are the queued messages (due or deferred), in the order
        they should be sent, ``retry_at`` maps the names of deferred ones to
        their next attempt and ``claimed`` holds the names being sent."""

    def claim(entry, lease, exact=False):
        """Claim *entry* for sending for *lease* seconds: an
        :class:`IQueueClaim`, or None if it is gone or claimed by a live
        processor (a claim whose lease ran out is broken first).

        A store drained by many processors at once may claim another due
        message of the lane instead of *entry* when *entry* is taken (the
        claim's ``entry`` says which), so that processors listing the same
        lane do not contend for the same messages; with *exact* (repairs),
        only *entry*, due or not.  PermissionError means the entry may not
        be claimed by this process."""

    def recover():
        """Finish what a crash cut short before a listing (e.g. roll
        committed transactions forward); return how many messages it
        handled."""

    def cleanup(scan, lease, now=None):
        """Tidy up after crashes, given the *scan* just made; return how
        many things were handled."""

    def relays():
        """The names of the relays (mailer names) that have a lane in this
        queue."""

    def relay(name, create=False):
        """The store of the lane of the relay *name*; ValueError if it is
        not usable (or missing, without *create*)."""

    def failed_entries():
        """The entries of the failed area, oldest first."""

    def find(name):
        """The queued or failed entry called *name*, or None."""

    def read(entry, size=-1):
        """The first *size* bytes (all with -1) of the queue file of
        *entry*; OSError (FileNotFoundError if gone) when it cannot be
        read."""

    def queued_at(entry):
        """When *entry* was queued (seconds since the epoch)."""

    def reason(entry):
        """Why the failed *entry* failed (a dict), or None."""

    def retry_state(entry):
        """The retry state of *entry* (a dict), or None."""

    def priority(entry):
        """The priority of *entry* (an int, higher first, 0 normal).  A
        message sent with ``not_before`` and not tried yet has the retry
        state ``{"not_before": T, "attempts": 0}`` and is due at T (see
        :mod:`mailoutbox.schedule`)."""

    def move_to_failed(entry, reason):
        """Move an unclaimed *entry* (one that cannot be sent) to the
        failed area with *reason*; return the new entry."""

    def requeue(entry):
        """Make a failed or deferred *entry* due now; return its entry."""

    def purge(entry):
        """Delete *entry* for good (never one that is being sent by a live
        processor: the caller checks the listing first)."""

    def watcher(on_wake, name):
        """An object with ``start() -> bool``, ``covers(relay) -> bool``,
        ``stop()`` and ``close()`` that calls ``on_wake(relays)`` from a
        thread of its own when messages are committed by other processes
        (inotify, LISTEN/NOTIFY), or None if the store cannot watch."""
