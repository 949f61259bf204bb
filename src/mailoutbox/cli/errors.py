"""Exit codes of the ``mailoutbox`` command and the error that carries one."""
from __future__ import annotations

__all__ = [
    "EXIT_BROKEN_PIPE",
    "EXIT_ERROR",
    "EXIT_INTERRUPTED",
    "EXIT_NOT_FOUND",
    "EXIT_NOT_SENT",
    "EXIT_OK",
    "EXIT_USAGE",
    "CLIError",
]

#: The command did what it was asked.
EXIT_OK = 0
#: ``run`` (without ``--daemon``): at least one message of the pass was
#: deferred or failed.
EXIT_NOT_SENT = 1
#: Bad command line, configuration file, address or queue path.
EXIT_USAGE = 2
#: ``show``, ``retry`` or ``purge``: a named message is not in the queue.
EXIT_NOT_FOUND = 3
#: An operating system error (permissions, disk, ...), a missing optional
#: dependency, or an unexpected error.
EXIT_ERROR = 4
#: Interrupted by Ctrl-C outside ``run``.
EXIT_INTERRUPTED = 130
#: The reader of the output went away (``mailoutbox list | head -1``): the
#: status a shell reports for a program that SIGPIPE ended (128 + 13).
EXIT_BROKEN_PIPE = 141


class CLIError(Exception):
    """An error reported as one line on stderr, ending the command with
    *exit_code*."""

    def __init__(self, message: str, exit_code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.exit_code = exit_code
