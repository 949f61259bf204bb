"""The command reference in reStructuredText, generated from the parser.

``docs/_ext/cliref.py`` renders it in the documentation, so the reference
cannot drift from the command.
"""
from __future__ import annotations

import argparse
import re

__all__ = ["format_reference"]

_SPECIAL = re.compile(r"([*`|\\])")
_OPTION = re.compile(r"(?<![\w-])(--?[a-z][a-z0-9-]*)")


def _escape(text: str) -> str:
    """*text* as reST: markup escaped, options as literals (so that
    ``--daemon`` does not turn into an en dash)."""
    text = _SPECIAL.sub(r"\\\1", " ".join(text.split()))
    return _OPTION.sub(r"``\1``", text)


def _usage(parser: argparse.ArgumentParser) -> list[str]:
    formatter = parser.formatter_class(prog=parser.prog, width=78)
    formatter.add_usage(
        parser.usage, parser._actions, parser._mutually_exclusive_groups
    )
    text = formatter.format_help().strip()
    return [".. code-block:: text", ""] + ["   " + line for line in text.splitlines()]


def _option_name(action: argparse.Action) -> str:
    if not action.option_strings:
        return str(action.metavar or action.dest)
    if action.nargs == 0:
        return ", ".join(action.option_strings)
    metavar = action.metavar or action.dest.upper()
    return ", ".join(f"{option} {metavar}" for option in action.option_strings)


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _describe(parser: argparse.ArgumentParser, underline: str) -> list[str]:
    title = parser.prog
    lines = [title, underline * len(title), "", f".. program:: {parser.prog}", ""]
    if parser.description:
        lines += [_escape(parser.description), ""]
    lines += [*_usage(parser), ""]
    for group in parser._action_groups:
        actions = [
            a for a in group._group_actions
            if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction))
        ]
        if not actions:
            continue
        title = group.title or ""
        lines += [f".. rubric:: {title[:1].upper()}{title[1:]}", ""]
        if group.description:
            lines += [_escape(group.description), ""]
        for action in actions:
            lines += [f".. option:: {_option_name(action)}", ""]
            lines += ["   " + _escape(action.help or ""), ""]
    if parser.epilog:
        lines += [_escape(parser.epilog), ""]
    return lines


def format_reference(parser: argparse.ArgumentParser | None = None) -> str:
    """The reference of *parser* (default: the ``mailoutbox`` command's) and
    of its subcommands, as reStructuredText sections."""
    if parser is None:
        from mailoutbox.cli import build_parser

        parser = build_parser()
    lines = _describe(parser, "-")
    for subparser in _subcommands(parser).values():
        lines += _describe(subparser, "~")
    return "\n".join(lines).rstrip() + "\n"
