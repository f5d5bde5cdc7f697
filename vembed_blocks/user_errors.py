"""User mistakes (a flag, a file, a folder, a row) as one clear line instead of a traceback.

``UserError`` is what a block raises for a mistake the user fixes in their command or data; it is
a ``ValueError``, so code that catches ``ValueError`` keeps working.
"""

from __future__ import annotations

__all__ = ["UserError"]


class UserError(ValueError):
    """A mistake in the run's inputs (a flag value, a missing file or folder, a folder of the wrong kind,
    a bad row): the message names what is wrong and the fix; recipes print it without a traceback."""
