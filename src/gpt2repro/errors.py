"""One exception type for mistakes a user can fix.

The CLI turns a ``UserError`` into a single line on stderr and exit code 2 (no traceback), so every
module raises it with a message that says what is wrong *and* how to fix it.
"""


class UserError(Exception):
    """Bad input or an impossible option: the message is shown to the user as is."""


def first_line(error: BaseException, limit: int = 160) -> str:
    """The first non-blank line of ``error``'s message, cut to ``limit`` characters, else its type's name.

    Why: a one-line report quotes what a library said, and libraries raise multi-line messages (the hub,
    W&B, torch.load's weights-only advice) and empty ones (torch.load of an empty file: ``EOFError()``)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0][:limit] if lines else type(error).__name__


def typed_first_line(error: BaseException, limit: int = 160) -> str:
    """``Type: first line`` of ``error`` (just ``Type`` for an empty message)."""
    name = type(error).__name__
    line = first_line(error, limit)
    return name if line == name else f"{name}: {line}"
