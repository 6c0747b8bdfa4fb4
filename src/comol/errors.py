"""Exceptions shared by every layer of comol.

:class:`UserError` marks bad input (a missing file, a malformed record, an out-of-range option): the
problem is the user's to fix, not a bug. Its message is one line naming the file/field and the fix. The
``comol`` command line prints it without a traceback and exits with status 2 (``--verbose`` shows the
traceback).
"""

from __future__ import annotations


class UserError(ValueError):
    """Bad input that the user can fix; the message names the problem (file, line, field) and the fix."""
