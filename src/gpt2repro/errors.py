"""One exception type for mistakes a user can fix.

The CLI turns a ``UserError`` into a single line on stderr and exit code 2 (no traceback), so every
module raises it with a message that says what is wrong *and* how to fix it.
"""


class UserError(Exception):
    """Bad input or an impossible option: the message is shown to the user as is."""
