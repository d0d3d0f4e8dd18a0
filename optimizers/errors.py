"""The one base class of every error a user can cause and fix (a bad setting, a missing file, a refused
lineage operation), as opposed to a bug.

Why one base: the command line (``train.py``) catches :class:`UserError` once and turns it into a
one-line message and an exit status, with no traceback; every other exception is a bug and keeps its
traceback. Each module keeps its own subclass (``ConfigError``, ``CheckpointError``, ...) so callers that
catch the specific name keep working, and each subclass also derives from the built-in exception it
subclassed before (``ValueError``, ``RuntimeError``, ``FileNotFoundError``). This module imports nothing,
so every package (``tasks``, ``optimizers``, ``kernels``, ``meta``) can use it without a cycle.
"""

from __future__ import annotations


class UserError(Exception):
    """An error whose message tells the user what to change; ``exit_status`` is what ``train.py`` returns.

    2 is argparse's status for a usage error, so a bad flag and a bad value of a flag exit alike."""

    exit_status: int = 2
