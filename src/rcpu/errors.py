"""User-facing errors.

Every problem a user can fix (bad flag, missing file, unsupported model) raises
:class:`RcpuError` with a one-line message that names the problem and the fix.
The CLI prints it as a single line and exits non-zero; the Python API lets it
propagate so callers can catch it.
"""


class RcpuError(Exception):
    """A problem with the user's input or environment, explained in one line."""
