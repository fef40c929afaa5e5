"""The one exception type for user mistakes (bad file, bad config, missing cache).

The CLI prints it as a single line and exits non-zero; anything else is a bug and keeps
its traceback.
"""


class VidpipeError(Exception):
    """A problem the user can fix; the message names the file and the problem."""


class BatchIncomplete(VidpipeError):
    """A batch ran to its end but some inputs failed (each already reported): exit code 1."""


def first_line(exc: BaseException) -> str:
    """An exception's first message line (libraries' messages run to many lines) for a
    one-line error; its type name when it has no message."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class DiskFull(VidpipeError):
    """A write failed for lack of space or quota (ENOSPC, EDQUOT): exit code 1, as for a batch
    that could not finish; what was being written is removed, what was finished is kept."""
