"""Where the ``mailoutbox`` command writes: one object to replace in tests."""
from __future__ import annotations

import sys
from typing import BinaryIO
from typing import TextIO

__all__ = ["Console"]


class Console:
    """The streams of a command.

    *stdout* receives results, *stderr* errors, log records and progress;
    *stdin* (binary) is read by ``send``.  Each defaults to the process's
    stream as it is when the command runs.
    """

    def __init__(
        self,
        stdout: TextIO | None = None,
        stderr: TextIO | None = None,
        stdin: BinaryIO | None = None,
    ) -> None:
        self.stdout = stdout if stdout is not None else sys.stdout
        self.stderr = stderr if stderr is not None else sys.stderr
        self._stdin = stdin

    @property
    def stdin(self) -> BinaryIO:
        if self._stdin is not None:
            return self._stdin
        return sys.stdin.buffer

    def out(self, text: str = "") -> None:
        """Write a line of output."""
        self.stdout.write(text + "\n")
        self.stdout.flush()

    def error(self, text: str) -> None:
        """Write an error line, prefixed with the program's name."""
        self.stderr.write(f"mailoutbox: error: {text}\n")
        self.stderr.flush()

    def note(self, text: str) -> None:
        """Write a line of information for a person on stderr."""
        self.stderr.write(f"mailoutbox: {text}\n")
        self.stderr.flush()

    def is_terminal(self) -> bool:
        """Whether stderr is a terminal (progress is shown only there)."""
        isatty = getattr(self.stderr, "isatty", None)
        try:
            return bool(isatty and isatty())
        except ValueError:  # closed stream
            return False
