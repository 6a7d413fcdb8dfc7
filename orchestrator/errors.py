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


def check_version(
    name: str, version: str, supported: tuple[tuple[int, int], tuple[int, int]], use: str, module: str
) -> None:
    """UsageError unless `version` of the package `name` (its display name: "Ray") is in `supported`,
    [from, to) as (major, minor): what each module of a dependency's private API or unpublished conventions
    (`module`) checks on import; `use` says what it takes ("uses Ray's private API")."""
    (low, high), found = supported, tuple(int(part) for part in version.split("+")[0].split(".")[:2])
    if not low <= found < high:
        pin = f"{name.lower()}>={low[0]}.{low[1]},<{high[0]}.{high[1]}"
        raise UsageError(
            f"orchestrator {use} as of {pin} ({module}); this is {name} {version}: install {pin}, or port "
            "that module"
        )
