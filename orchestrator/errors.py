"""The command's error contract: which failures reach the console as one line, and with which exit code.

- 0: done.
- 1, `Unavailable` (and OSError): the environment cannot give what the command needs: a service down or
  silent, data unreadable. The line says the cause and a hint.
- 2, `UsageError` (SpecError, LookupError of ours, argparse): a mistake in the input. The line names the
  field or argument, the value (cut: `shown`) and what is allowed.
- 70, anything else: a bug of ours. One line; `-v` prints the traceback.
- 130: Ctrl-C.

Library code raises these two classes; `cli.main` turns them into the line and the exit code.
"""

EXIT_UNAVAILABLE = 1
EXIT_USAGE = 2
EXIT_INTERNAL = 70  # sysexits' EX_SOFTWARE
EXIT_INTERRUPTED = 130

MAX_VALUE_CHARS = 200  # a value quoted in an error line is cut to about this


class UsageError(ValueError):
    """A request that cannot be carried out as asked; the message names the field or argument, the value
    (`shown`) and what would work. Exit 2."""


class Unavailable(RuntimeError):
    """Something the environment cannot give (a service down or silent, data unreadable); the message says
    the cause and a hint. Exit 1."""


def cut(text: str, limit: int = MAX_VALUE_CHARS) -> str:
    """`text` cut to about `limit` characters, saying how long it was."""
    return text if len(text) <= limit else f"{text[: limit - 24]}... ({len(text):,} characters)"


def shown(value: object, limit: int = MAX_VALUE_CHARS) -> str:
    """How an error line quotes a value it was given: its repr, cut to about `limit` characters."""
    return cut(repr(value), limit)
