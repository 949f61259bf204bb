"""Settings of the ``mailoutbox`` command: option values, INI files, defaults.

A setting comes from, in increasing order of precedence: its default, the
``[app:zope-sendmail]`` section of the ``--config`` file (zope.sendmail's
``zope-sendmail`` script reads the same section), its ``[mailoutbox]``
section, and the command line.

Each ``[mailoutbox:relay NAME]`` section configures the SMTP server of the
relay NAME, which sends the messages routed to the mailer NAME
(``send(..., mailer=NAME)``), with the SMTP keys of ``[mailoutbox]``.  A
relay section stands on its own: what it does not set takes its default,
not the value of ``[mailoutbox]``.
"""
from __future__ import annotations

import argparse
import configparser
import dataclasses
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mailoutbox.cli.console import Console
from mailoutbox.cli.errors import CLIError
from mailoutbox.queue import DEFAULT_CONCURRENCY
from mailoutbox.relays import check_name

__all__ = [
    "MAILOUTBOX_SECTION",
    "RELAY_SECTION",
    "ZOPE_SENDMAIL_KEYS",
    "ZOPE_SENDMAIL_SECTION",
    "RelaySettings",
    "Settings",
    "boolean",
    "duration",
    "factor",
    "port",
    "positive_int",
    "rate",
    "read_config",
    "resolve",
]

ZOPE_SENDMAIL_SECTION = "app:zope-sendmail"
MAILOUTBOX_SECTION = "mailoutbox"
RELAY_SECTION = "mailoutbox:relay"
PASSWORD_KEYS = ("password", "password_env", "password_file")


@dataclass
class RelaySettings:
    """The SMTP server of one relay (a ``[mailoutbox:relay NAME]`` section)."""

    hostname: str = "localhost"
    port: int | None = None  # 25, or 465 with implicit_tls
    username: str | None = None
    password: str | None = dataclasses.field(default=None, repr=False)
    force_tls: bool = False
    no_tls: bool = False
    implicit_tls: bool = False
    ca_file: str | None = None
    timeout: float = 10.0
    rate: float | None = None  # messages per second; None: no limit
    max_connections: int | None = None

    @property
    def smtp_port(self) -> int:
        if self.port is not None:
            return self.port
        return 465 if self.implicit_tls else 25


@dataclass
class Settings(RelaySettings):
    """Everything ``run`` needs: the default relay's SMTP server, and the
    processor's options; other commands use ``queue_path`` only."""

    queue_path: str | None = None
    interval: float = 3.0
    concurrency: int = DEFAULT_CONCURRENCY
    lease: float = 30.0
    retry_initial: float = 60.0
    retry_factor: float = 2.0
    retry_cap: float = 3600.0
    max_age: float = 5 * 24 * 3600.0
    #: The relays, by name.
    relays: dict[str, RelaySettings] = dataclasses.field(default_factory=dict)


# -- value types (for argparse and INI files alike) --------------------------

_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([smhd]?)\s*$", re.I)


def duration(text: str) -> float:
    """Seconds, or a number followed by ``s``, ``m``, ``h`` or ``d``."""
    match = _DURATION.match(str(text))
    if not match or not 0 < float(match.group(1)) < 1e12:
        raise argparse.ArgumentTypeError(
            f"invalid duration {text!r}: use a positive number of seconds,"
            " or a number followed by s, m, h or d (e.g. 90s, 5m, 2h, 5d)"
        )
    return float(match.group(1)) * _UNITS[match.group(2).lower() or "s"]


def _whole_number(text: str, low: int, high: int, error: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = low - 1
    if not low <= value <= high:
        raise argparse.ArgumentTypeError(error)
    return value


def port(text: str) -> int:
    """A TCP port number."""
    return _whole_number(
        text, 1, 65535, f"invalid port {text!r}: use a number from 1 to 65535"
    )


def positive_int(text: str) -> int:
    """A whole number of at least 1."""
    return _whole_number(
        text, 1, sys.maxsize,
        f"invalid number {text!r}: use a whole number of at least 1",
    )


def factor(text: str) -> float:
    """A number of at least 1 (the growth of the retry delay)."""
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 1.0 <= value < 1e6:  # also rejects NaN and infinity
        raise argparse.ArgumentTypeError(
            f"invalid factor {text!r}: use a number of at least 1"
        )
    return value


_RATE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(?:/\s*([smh]))?\s*$", re.I)


def rate(text: str) -> float:
    """Messages per second: a number above 0, or a number per second,
    minute or hour (``14``, ``14/s``, ``30/m``, ``500/h``)."""
    match = _RATE.match(str(text))
    if not match or not 0 < float(match.group(1)) < 1e12:
        raise argparse.ArgumentTypeError(
            f"invalid rate {text!r}: use a number of messages per second"
            " above 0, or a number per second, minute or hour (e.g. 14,"
            " 0.5, 30/m, 500/h)"
        )
    return float(match.group(1)) / _UNITS[(match.group(2) or "s").lower()]


_BOOLEANS = configparser.ConfigParser.BOOLEAN_STATES


def boolean(text: str) -> bool:
    """``true``/``false``, ``yes``/``no``, ``on``/``off`` or ``1``/``0``."""
    try:
        return _BOOLEANS[str(text).strip().lower()]
    except KeyError:
        raise argparse.ArgumentTypeError(
            f"invalid boolean {text!r}: use true or false"
        ) from None


def _text(text: str) -> str:
    return str(text).strip()


_ZOPE_SENDMAIL_TYPES: dict[str, Callable[[str], Any]] = {
    "interval": duration,
    "hostname": _text,
    "port": port,
    "username": _text,
    "password": _text,
    "force_tls": boolean,
    "no_tls": boolean,
    "queue_path": _text,
}
ZOPE_SENDMAIL_KEYS = tuple(_ZOPE_SENDMAIL_TYPES)

_MAILOUTBOX_TYPES: dict[str, Callable[[str], Any]] = {
    **_ZOPE_SENDMAIL_TYPES,
    "implicit_tls": boolean,
    "ca_file": _text,
    "timeout": duration,
    "password_env": _text,
    "password_file": _text,
    "concurrency": positive_int,
    "rate": rate,
    "max_connections": positive_int,
    "lease": duration,
    "retry_initial": duration,
    "retry_factor": factor,
    "retry_cap": duration,
    "max_age": duration,
}

_RELAY_KEYS = (
    "hostname", "port", "username", "password", "password_env", "password_file",
    "force_tls", "no_tls", "implicit_tls", "ca_file", "timeout", "rate",
    "max_connections",
)
_RELAY_TYPES = {key: _MAILOUTBOX_TYPES[key] for key in _RELAY_KEYS}


# -- INI files ------------------------------------------------------------


def _merge(values: dict[str, Any], layer: dict[str, Any]) -> None:
    """Update *values* with *layer*; a layer naming any password source
    replaces the password sources of the layers below it."""
    if any(layer.get(key) is not None for key in PASSWORD_KEYS):
        for key in PASSWORD_KEYS:
            values.pop(key, None)
    values.update({k: v for k, v in layer.items() if v is not None})


def read_config(path: str, console: Console) -> dict[str, Any]:
    """The settings in the INI file at *path* (``-``: standard input)."""
    if path == "-":
        name = "<stdin>"
        text = console.stdin.read().decode("utf-8", "replace")
        here = os.getcwd()
    else:
        name = path
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as exc:
            reason = getattr(exc, "strerror", None) or str(exc)
            raise CLIError(
                f"cannot read the configuration file {path}: {reason}"
            ) from None
        here = os.path.dirname(os.path.abspath(path))
    # PasteDeploy gives %(here)s and %(__file__)s; so do we.
    defaults = {"here": here, "__file__": os.path.join(here, os.path.basename(name))}
    parser = configparser.ConfigParser(defaults=defaults)
    try:
        parser.read_string(text, source=name)
    except configparser.Error as exc:
        raise CLIError(
            f"invalid configuration file {name}: {_one_line(exc)}"
        ) from None
    sections = [
        (section, types)
        for section, types in (
            (ZOPE_SENDMAIL_SECTION, _ZOPE_SENDMAIL_TYPES),
            (MAILOUTBOX_SECTION, _MAILOUTBOX_TYPES),
        )
        if parser.has_section(section)
    ]
    if not sections:
        raise CLIError(
            f"the configuration file {name} has neither a [{MAILOUTBOX_SECTION}]"
            f" nor an [{ZOPE_SENDMAIL_SECTION}] section"
        )
    values: dict[str, Any] = {}
    for section, types in sections:
        _merge(values, _read_section(parser, section, types, name, defaults))
    relays = {}
    for section in parser.sections():
        kind, _space, relay = section.partition(" ")
        if kind != RELAY_SECTION:
            if section.startswith(MAILOUTBOX_SECTION + ":"):
                raise CLIError(
                    f"{name}: unknown section [{section}] (a relay's section is"
                    f" [{RELAY_SECTION} NAME])"
                )
            continue
        relay = relay.strip()
        try:
            check_name(relay)
        except ValueError as exc:
            raise CLIError(f"{name}: [{section}]: {exc}") from None
        relays[relay] = _read_section(parser, section, _RELAY_TYPES, name, defaults)
    if relays:
        values["relays"] = relays
    return values


def _read_section(parser: configparser.ConfigParser, section: str,
                  types: dict[str, Callable[[str], Any]], name: str,
                  defaults: dict[str, str]) -> dict[str, Any]:
    layer = {}
    for key in parser.options(section):
        if key in defaults and parser.get(section, key, raw=True) == str(
            defaults[key]
        ):
            continue
        if key not in types:
            if section != ZOPE_SENDMAIL_SECTION:
                raise CLIError(
                    f"{name}: unknown key {key!r} in [{section}]; known keys:"
                    f" {', '.join(sorted(types))}"
                )
            continue  # other keys of a PasteDeploy section
        try:
            text = parser.get(section, key)
            if text.strip() in ("", "None"):
                continue  # unset (zope.sendmail writes unset values as None)
            layer[key] = types[key](text)
        except (argparse.ArgumentTypeError, configparser.Error) as exc:
            raise CLIError(
                f"{name}: [{section}] {key}: {_one_line(exc)}"
            ) from None
    return layer


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


# -- putting it together ------------------------------------------------------


def _password(values: dict[str, Any]) -> str | None:
    if values.get("password") is not None:
        return values["password"]
    variable = values.get("password_env")
    if variable is not None:
        try:
            return os.environ[variable]
        except KeyError:
            raise CLIError(
                f"the environment variable {variable} (for the password) is"
                " not set"
            ) from None
    path = values.get("password_file")
    if path is not None:
        try:
            with open(path, encoding="utf-8") as f:
                return f.readline().rstrip("\r\n")
        except (OSError, UnicodeDecodeError) as exc:
            reason = getattr(exc, "strerror", None) or str(exc)
            raise CLIError(
                f"cannot read the password file {path}: {reason}"
            ) from None
    return None


def resolve(args: argparse.Namespace, console: Console, *,
            need_queue: bool = True) -> Settings:
    """The settings given by the command line *args* and its ``--config``."""
    values: dict[str, Any] = {}
    config = getattr(args, "config", None)
    if config:
        _merge(values, read_config(config, console))
    fields = {f.name for f in dataclasses.fields(Settings)}
    from_args = {
        key: getattr(args, key, None)
        for key in (*fields, *PASSWORD_KEYS)
    }
    from_args["queue_path"] = getattr(args, "queue", None)
    _merge(values, from_args)
    password = _password(values)
    relays = {
        relay: _relay_settings(relay, layer)
        for relay, layer in values.pop("relays", {}).items()
    }
    settings = Settings(
        **{k: v for k, v in values.items() if k in fields and k != "password"},
        password=password,
        relays=relays,
    )
    if need_queue and not settings.queue_path:
        raise CLIError(
            "no queue: give the queue's directory, or a --config file whose"
            " section sets queue_path"
        )
    _check_smtp(settings, "")
    return settings


def _relay_settings(relay: str, values: dict[str, Any]) -> RelaySettings:
    fields = {f.name for f in dataclasses.fields(RelaySettings)}
    settings = RelaySettings(
        **{k: v for k, v in values.items() if k in fields and k != "password"},
        password=_password(values),
    )
    _check_smtp(settings, f"relay {relay!r}: ")
    return settings


def _check_smtp(settings: Settings | RelaySettings, where: str) -> None:
    if bool(settings.username) != bool(settings.password):
        raise CLIError(f"{where}a username and a password must be given together")
    for first, second in (("force_tls", "no_tls"), ("implicit_tls", "no_tls")):
        if getattr(settings, first) and getattr(settings, second):
            raise CLIError(
                f"{where}{first.replace('_', '-')} and"
                f" {second.replace('_', '-')} contradict each other"
            )
