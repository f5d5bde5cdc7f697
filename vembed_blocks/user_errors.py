"""User mistakes (a flag, a file, a folder, a row) as one clear line instead of a traceback.

``UserError`` is what a block raises for a mistake the user fixes in their command or data; it is
a ``ValueError``, so code that catches ``ValueError`` keeps working. A recipe wraps its entry point:

    if __name__ == "__main__":
        with report_user_errors():
            main()

and a user error (`USER_ERRORS`, a class with ``user_error = True``, or one of the data errors named in
`USER_ERROR_NAMES`) then ends the run with ``error: <message>``, one hint line and exit status 2;
``--debug`` or ``VEMBED_DEBUG=1`` shows the full traceback instead. Anything else (a bug) keeps its
traceback. A user error raised in a DataLoader worker reaches the main process as the ``RuntimeError``
torch re-raises it as; its original message is found in that error's text and printed the same way.

Imports the standard library only (no torch, no other package module): a recipe can import it first.
"""

from __future__ import annotations

import builtins
import os
import sys
from types import TracebackType

__all__ = [
    "DEBUG_HINT",
    "USER_ERRORS",
    "USER_ERROR_NAMES",
    "UserError",
    "debug_requested",
    "is_user_error",
    "report_user_errors",
    "user_error_message",
]


class UserError(ValueError):
    """A mistake in the run's inputs (a flag value, a missing file or folder, a folder of the wrong kind,
    a bad row): the message names what is wrong and the fix; recipes print it without a traceback."""


# What a user fixes in their command, files or data. FileNotFoundError & co. carry the path in their message.
USER_ERRORS: tuple[type[BaseException], ...] = (
    UserError,
    FileNotFoundError,
    NotADirectoryError,
    IsADirectoryError,
    PermissionError,
    FileExistsError,
)
# User error classes of other package modules, named rather than imported: importing them here would load
# those modules (and their imports) into every recipe before it starts. Subclasses count too.
USER_ERROR_NAMES = frozenset(
    {
        "vembed_blocks.data.images.ImageLoadError",  # a row's image is missing or unreadable (file:line, path)
        "vembed_blocks.data.records.RecordError",  # a malformed row (file:line, what is wrong)
    }
)
DEBUG_HINT = "(the traceback: rerun with --debug or VEMBED_DEBUG=1)"
# How torch's DataLoader re-raises a worker's exception it cannot rebuild (a class whose __init__ takes
# more than the message): a RuntimeError whose text holds the worker's formatted traceback.
_WORKER_HEADER = "\nOriginal Traceback (most recent call last):\n"
_TRACEBACK_LINE = "Traceback (most recent call last):"


def _qualified_names(cls: type) -> set[str]:
    return {f"{c.__module__}.{c.__qualname__}" for c in cls.__mro__}


def _is_user_error_class(cls: type) -> bool:
    return (
        issubclass(cls, USER_ERRORS)
        or getattr(cls, "user_error", False) is True
        or bool(_qualified_names(cls) & USER_ERROR_NAMES)
    )


def _worker_error(exc: BaseException) -> tuple[str, str] | None:
    """``(qualified class name, message)`` of the exception a DataLoader worker raised, when ``exc`` is the
    ``RuntimeError`` torch re-raised it as; else None."""
    text = str(exc)
    if type(exc) is not RuntimeError or not text.startswith("Caught ") or _WORKER_HEADER not in text:
        return None
    lines = text.splitlines()
    start = max(i for i, line in enumerate(lines) if line.endswith(_TRACEBACK_LINE)) + 1
    while start < len(lines) and (lines[start].startswith(" ") or not lines[start]):
        start += 1  # the frames ("  File ...", the code line, its ^^^ markers) are indented
    name, sep, first = lines[start].partition(": ") if start < len(lines) else ("", "", "")
    if not sep or " " in name:
        return None
    return name, "\n".join([first, *lines[start + 1 :]]).rstrip()


def _named_class(name: str) -> type | None:
    """The class called ``name`` (``module.Qualname``) if its module is already loaded in this process."""
    module, _, qualname = name.rpartition(".")
    cls = getattr(sys.modules.get(module) if module else builtins, qualname, None)
    return cls if isinstance(cls, type) else None


def is_user_error(exc: BaseException) -> bool:
    """Whether ``exc`` is a user mistake to print as one message (see the module docstring)."""
    if _is_user_error_class(type(exc)):
        return True
    worker = _worker_error(exc)
    if worker is None:
        return False
    cls = _named_class(worker[0])
    return worker[0] in USER_ERROR_NAMES or (cls is not None and _is_user_error_class(cls))


def user_error_message(exc: BaseException) -> str:
    """What to print for the user error ``exc``: its message as is (a worker's: the original message)."""
    worker = _worker_error(exc)
    message = worker[1] if worker is not None else str(exc)
    return message.strip() or type(exc).__name__


def debug_requested() -> bool:
    """``--debug`` on the command line, or ``VEMBED_DEBUG`` set to anything but empty or ``0``."""
    return "--debug" in sys.argv[1:] or os.environ.get("VEMBED_DEBUG", "").strip() not in ("", "0")


def _rank_prefix() -> str:
    """``[rank N] `` under torchrun with more than one process (every rank prints its own error)."""
    rank, world = os.environ.get("RANK"), os.environ.get("WORLD_SIZE", "1")
    return f"[rank {rank}] " if rank is not None and world.isdigit() and int(world) > 1 else ""


class _ReportUserErrors:
    """The context manager `report_user_errors` returns. A class rather than ``@contextmanager``: an exception
    it lets through keeps its traceback exactly, without contextlib's frames."""

    def __init__(self, debug: bool | None) -> None:
        self.debug = debug

    def __enter__(self) -> "_ReportUserErrors":
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: TracebackType | None) -> bool:
        if exc is None or not isinstance(exc, Exception) or not is_user_error(exc):
            return False  # no error, a bug, or SystemExit / KeyboardInterrupt: unchanged
        if self.debug if self.debug is not None else debug_requested():
            return False
        prefix = _rank_prefix()
        lines = [f"error: {user_error_message(exc)}", DEBUG_HINT]
        sys.stdout.flush()  # what the run printed so far comes before the error
        print("\n".join(prefix + line for line in "\n".join(lines).splitlines()), file=sys.stderr, flush=True)
        raise SystemExit(2)


def report_user_errors(debug: bool | None = None) -> _ReportUserErrors:
    """Context manager for a recipe's ``__main__`` block: a user error becomes ``error: <message>`` plus one hint
    line on stderr and exit status 2; other exceptions propagate unchanged.

    ``debug``: True lets user errors propagate too (full traceback); None (default) means `debug_requested`.
    Under torchrun (``RANK`` set, ``WORLD_SIZE`` > 1) every printed line starts with ``[rank N] ``.
    """
    return _ReportUserErrors(debug)
