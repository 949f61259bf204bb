"""``status``, ``list`` and ``show``: look at a queue without changing it.

Messages routed to a relay are in the relay's folder inside the queue; the
three commands show them with the others, and tell the relay.

On a PostgreSQL queue, ``status`` also shows the prepared transactions a
crash left (:mod:`mailoutbox.postgresql.recovery`), and exits with status 1
while one is older than :data:`ORPHAN_AGE`; ``list --sent`` shows the sent
log of a queue that keeps one (``keep_sent=DAYS`` in its URL).
"""
from __future__ import annotations

import argparse
import json
import time
from typing import Any

from mailoutbox.cli.common import add_common_arguments
from mailoutbox.cli.common import add_queue_argument
from mailoutbox.cli.common import queue_path
from mailoutbox.cli.console import Console
from mailoutbox.cli.errors import EXIT_ERROR
from mailoutbox.cli.errors import EXIT_NOT_SENT
from mailoutbox.cli.errors import EXIT_OK
from mailoutbox.cli.errors import CLIError
from mailoutbox.cli.view import STATES
from mailoutbox.cli.view import WAITING
from mailoutbox.cli.view import MessageInfo
from mailoutbox.cli.view import QueueView
from mailoutbox.cli.view import clean
from mailoutbox.cli.view import format_age
from mailoutbox.cli.view import format_priority
from mailoutbox.cli.view import format_time
from mailoutbox.cli.view import open_queue
from mailoutbox.cli.view import read_file
from mailoutbox.envelope import parse_queue_file
from mailoutbox.stores import is_url

__all__ = ["ORPHAN_AGE", "add_parsers", "describe_error", "list_messages",
           "list_sent", "orphans_data", "show", "show_data", "status",
           "status_data"]

#: Format version of ``status --json`` and ``list --json``.
JSON_VERSION = 1

#: Seconds after which a prepared transaction of the queue is taken for one
#: that a crash left (a living one is finished within milliseconds): then
#: ``status`` warns and exits with status 1.  The default age
#: ``mailoutbox recover`` acts on.
ORPHAN_AGE = 60.0


def add_parsers(commands: Any) -> None:
    parser = commands.add_parser(
        "status",
        help="count the messages in the queue, by state",
        description="Count the queued, deferred, sending and failed messages"
        " and tell the age of the oldest one; --json is for monitoring.",
    )
    add_queue_argument(parser)
    parser.add_argument(
        "--json", action="store_true", help="print one JSON object (see the docs)"
    )
    add_common_arguments(parser)
    parser.set_defaults(func=status)

    parser = commands.add_parser(
        "list",
        help="list the messages in the queue",
        description="List the messages waiting in the queue (queued, deferred"
        " and sending), oldest first, or those of another state.  Under a"
        " message tried before: its last error, SMTP code, server and"
        " attempts, and when it is tried next (or why it failed).",
    )
    add_queue_argument(parser)
    which = parser.add_mutually_exclusive_group()
    which.add_argument(
        "--failed", dest="states", action="store_const", const=("failed",),
        help="list the failed messages instead",
    )
    which.add_argument(
        "--deferred", dest="states", action="store_const", const=("deferred",),
        help="list only the deferred messages",
    )
    which.add_argument(
        "--all", dest="states", action="store_const", const=STATES,
        help="list every message, failed ones too",
    )
    parser.add_argument(
        "--json", action="store_true", help="print one JSON object (see the docs)"
    )
    add_common_arguments(parser)
    which.add_argument(
        "--scheduled", dest="states", action="store_const", const=("scheduled",),
        help="list only the messages scheduled for later",
    )
    which.add_argument(
        "--sent", dest="states", action="store_const", const=("sent",),
        help="list the sent log instead (a PostgreSQL queue whose URL sets"
        " keep_sent=DAYS)",
    )
    parser.set_defaults(func=list_messages, states=WAITING)

    parser = commands.add_parser(
        "show",
        help="show one message: envelope, headers and state",
        description="Show the envelope, headers and retry or failure state of"
        " one message, named by its id (file name, as 'list' prints it) or"
        " by its Message-Id.",
    )
    add_queue_argument(parser)
    parser.add_argument("id", metavar="ID", help="the message's id or Message-Id")
    output = parser.add_mutually_exclusive_group()
    output.add_argument(
        "--raw", action="store_true",
        help="print the message itself (headers and body) instead",
    )
    output.add_argument(
        "--json", action="store_true", help="print one JSON object (see the docs)"
    )
    add_common_arguments(parser)
    parser.set_defaults(func=show)


def _summary(view: QueueView, messages: list[MessageInfo]) -> dict[str, Any]:
    waiting = view.select(("queued", "deferred", "sending"), messages)
    deferred = [m.retry_at for m in messages if m.state == "deferred"]
    scheduled = [m.retry_at for m in messages if m.state == "scheduled"]
    return {
        **view.counts(messages),
        "oldest_age": _age(view, waiting),
        "next_attempt": min(deferred) if deferred else None,  # type: ignore[type-var]
        "next_scheduled": min(scheduled) if scheduled else None,  # type: ignore[type-var]
        "oldest_failed_age": _age(view, view.select(("failed",), messages)),
    }


def status_data(view: QueueView) -> dict[str, Any]:
    """What ``status --json`` prints: the counts of every message, and, when
    the queue has relay folders, those of each under ``relays``."""
    data = {
        "version": JSON_VERSION,
        "queue": view.location,
        "time": view.now,
        **_summary(view, view.messages),
    }
    if view.relays:
        data["relays"] = {
            name: _summary(view, view.routed_to(name)) for name in view.relays
        }
    return data


def _age(view: QueueView, messages: list[MessageInfo]) -> float | None:
    if not messages:
        return None
    return round(max(0.0, view.now - messages[0].queued_at), 3)


def orphans_data(path: str) -> list[dict[str, Any]] | None:
    """The prepared transactions a crash left in the PostgreSQL queue at
    *path*, oldest first, as ``status --json`` prints them under
    ``orphaned_transactions``; None for a Maildir queue."""
    if not is_url(path):
        return None
    from mailoutbox.postgresql.recovery import orphans

    return [{"gid": o.gid, "age": round(o.age, 3),
             "prepared": o.prepared.timestamp(), "owner": o.owner,
             "database": o.database} for o in orphans(path)]


def status(args: argparse.Namespace, console: Console) -> int:
    path = queue_path(args, console)
    view = QueueView(path)
    data = status_data(view)
    orphaned = orphans_data(path)
    if orphaned is not None:
        data["orphaned_transactions"] = orphaned
    stale = [o for o in orphaned or () if o["age"] >= ORPHAN_AGE]
    code = EXIT_NOT_SENT if stale else EXIT_OK
    if stale:
        console.note(clean(
            f"warning: {len(stale)} prepared transaction(s) left by a crash"
            f" hold locks in {view.location}: commit or roll them back with"
            f" 'mailoutbox recover {view.location}' (see --help)"))
    if args.json:
        console.out(json.dumps(data, sort_keys=True))
        return code
    console.out(f"queue     {data['queue']}")
    for state in _shown(data):
        line = f"{state:<9} {data[state]}"
        if state == "deferred" and data["next_attempt"] is not None:
            when = data["next_attempt"]
            line += (
                f"  (next attempt {format_time(when)},"
                f" in {format_age(when - view.now)})"
            )
        if state == "scheduled":
            when = data["next_scheduled"]
            line += (f"  (the first {format_time(when)},"
                     f" in {format_age(when - view.now)})")
        console.out(line)
    if data["oldest_age"] is not None:
        console.out(f"oldest    {format_age(data['oldest_age'])} old")
    for name, relay in data.get("relays", {}).items():
        counts = ", ".join(f"{state} {relay[state]}" for state in _shown(relay))
        console.out(clean(f"relay     {name}: {counts}"))
    if orphaned:
        console.out(f"orphaned  {len(orphaned)} prepared transaction(s), the"
                    f" oldest {format_age(orphaned[0]['age'])} old"
                    " (mailoutbox recover URL lists them)")
    return code


def _shown(counts: dict[str, Any]) -> list[str]:
    """The states ``status`` prints a count of: "scheduled" only if any."""
    return [s for s in STATES if s != "scheduled" or counts[s]]


def _recipients(message: MessageInfo) -> str:
    head = message.head
    if head.problem:
        return f"({head.problem})"
    first = head.toaddrs[0]
    more = len(head.toaddrs) - 1
    return first + (f" +{more}" if more else "")


def list_messages(args: argparse.Namespace, console: Console) -> int:
    if args.states == ("sent",):
        return list_sent(args, console)
    view = QueueView(queue_path(args, console))
    messages = view.select(args.states)
    if args.json:
        console.out(json.dumps(
            {
                "version": JSON_VERSION,
                "queue": view.location,
                "time": view.now,
                "messages": [m.as_dict(view.now) for m in messages],
            },
            sort_keys=True,
        ))
        return EXIT_OK
    if not messages:
        console.out(f"no {' or '.join(args.states)} messages")
        return EXIT_OK
    for message in messages:
        subject = message.head.header("Subject")
        via = [] if message.relay is None else [f"via {message.relay}"]
        if message.priority:
            via.append(f"priority {format_priority(message.priority)}")
        console.out(clean("  ".join([
            message.name,
            f"{message.state:<9}",
            f"{format_age(view.now - message.queued_at):>7}",
            *via,
            _recipients(message),
            repr(subject) if subject is not None else "",
        ]).rstrip()))
        why = describe_error(view, message)
        if why is not None:
            console.out(clean(f"    {why}"))
    return EXIT_OK


def list_sent(args: argparse.Namespace, console: Console) -> int:
    """``list --sent``: the sent log of a PostgreSQL queue, oldest first."""
    path = queue_path(args, console)
    if not is_url(path):
        raise CLIError(f"a Maildir queue keeps no sent log ({clean(path)});"
                       " a PostgreSQL queue does, with keep_sent=DAYS in its URL")
    store = open_queue(path)
    try:
        sent = store.sent_entries()
        now = time.time()
        keep = store.keep_sent
    finally:
        store.close()
    if args.json:
        console.out(json.dumps({"version": JSON_VERSION, "queue": store.path,
                                "time": now, "keep_sent": keep,
                                "messages": sent}, sort_keys=True))
        return EXIT_OK
    if not sent:
        console.out("no sent messages" + (
            "" if keep else " (the queue URL sets no keep_sent=DAYS: sent"
            " messages are deleted)"))
        return EXIT_OK
    for entry in sent:
        to = entry["to"]
        recipients = to[0] + (f" +{len(to) - 1}" if len(to) > 1 else "")
        subject = entry["subject"]
        console.out(clean("  ".join([
            entry["id"],
            "sent",
            format_time(entry["sent_at"]),
            *([] if entry["relay"] is None else [f"via {entry['relay']}"]),
            recipients,
            repr(subject) if subject is not None else "",
        ]).rstrip()))
    return EXIT_OK


def describe_error(view: QueueView, message: MessageInfo) -> str | None:
    """The line under a message in ``list``: why it is deferred (its last
    error, SMTP code, server, attempts) and when it is tried next, or why
    it failed; None for a message never tried.  Unknown parts are left
    out."""
    when = message.scheduled_for
    if when is not None:
        return f"scheduled for {format_time(when)}" + (
            f" (in {format_age(when - view.now)})" if when > view.now else ", due")
    last = message.last_error()
    details = [f"{name} {last[name]}" for name in ("code", "server")
               if last[name] is not None]
    if last["attempts"]:
        details.append(f"attempt {last['attempts']}")
    if message.state == "deferred" and message.retry_at is not None:
        details.append(f"next attempt in {format_age(message.retry_at - view.now)}")
    elif message.state == "queued" and message.retry_at is not None:
        details.append("next attempt due")
    label = "error" if message.state == "failed" else "last error"
    if last["error"] is None:
        if not details:
            return None
        return ", ".join(details)
    return f"{label}: {last['error']}" + (f" ({', '.join(details)})"
                                          if details else "")


def _describe_state(view: QueueView, message: MessageInfo) -> str:
    when = message.scheduled_for
    if message.state == "scheduled" and when is not None:
        return f"scheduled (for {format_time(when)}, in {format_age(when - view.now)})"
    if message.state == "deferred" and message.retry_at is not None:
        when = message.retry_at
        return (
            f"deferred (next attempt {format_time(when)},"
            f" in {format_age(when - view.now)})"
        )
    if message.state == "sending":
        return "sending (claimed by a processor)"
    return message.state


def _state_lines(title: str, data: dict[str, Any] | None) -> list[str]:
    if not data:
        return []
    lines = [f"{title}:"]
    for key in sorted(data):
        value = data[key]
        if value is None:
            continue  # never "code: None"
        if isinstance(value, (int, float)) and not isinstance(value, bool) and (
            key == "time" or key.endswith(("_at", "_time", "_attempt"))
        ) and value > 1e9:
            value = f"{format_time(value)} ({value})"
        lines.append(f"  {key}: {value}")
    return lines


def show(args: argparse.Namespace, console: Console) -> int:
    view = QueueView(queue_path(args, console))
    message = view.find(args.id)
    if args.raw:
        return _show_raw(message, console)
    if args.json:
        console.out(json.dumps(show_data(view, message), sort_keys=True))
        return EXIT_OK
    head = message.head
    lines = [
        f"id:       {message.name}",
        f"state:    {_describe_state(view, message)}",
        f"file:     {message.entry.path}",
        *([] if message.relay is None else [f"relay:    {message.relay}"]),
        f"queued:   {format_time(message.queued_at)}"
        f" ({format_age(view.now - message.queued_at)} ago)",
        f"priority: {format_priority(message.priority)}",
    ]
    if head.problem:
        lines.append(f"problem:  {head.problem}")
    else:
        lines.append(f"from:     {head.fromaddr}")
        lines.append(f"to:       {', '.join(head.toaddrs)}")
    maildir = message.maildir or view.maildir
    if message.state == "failed":
        lines += _state_lines("failure", maildir.reason(message.entry))
    else:
        lines += _state_lines("retry state", maildir.retry_state(message.entry))
    if head.headers is not None:
        lines.append("headers:")
        lines += [f"  {name}: {value}" for name, value in head.headers.items()]
    for line in lines:
        console.out(clean(line))
    return EXIT_OK


def show_data(view: QueueView, message: MessageInfo) -> dict[str, Any]:
    """What ``show --json`` prints: the keys of ``list --json`` and
    ``version``, ``queue``, ``time``, ``file``, ``retry_state``,
    ``failure`` and ``headers``."""
    record = message.record or None
    headers = message.head.headers
    return {
        "version": JSON_VERSION,
        "queue": view.location,
        "time": view.now,
        **message.as_dict(view.now),
        "file": message.entry.path,
        "retry_state": record if message.state != "failed" else None,
        "failure": record if message.state == "failed" else None,
        "headers": None if headers is None else [
            [name, str(value)] for name, value in headers.items()],
    }


def _show_raw(message: MessageInfo, console: Console) -> int:
    if message.head.problem:
        raise CLIError(f"cannot show {message.name}: {message.head.problem}",
                       EXIT_ERROR)
    _from, _to, body = parse_queue_file(read_file(message.maildir,
                                                  message.entry))
    console.stdout.flush()
    buffer = getattr(console.stdout, "buffer", None)
    if buffer is not None:
        buffer.write(body)
        buffer.flush()
    else:
        console.stdout.write(body.decode("utf-8", "replace"))
    return EXIT_OK
