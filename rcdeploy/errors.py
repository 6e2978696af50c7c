"""The one error type the CLI turns into a single stderr line and exit code 2."""

from __future__ import annotations


class UsageError(Exception):
    """Bad input from the user (missing file, unknown name, value out of range).

    Raised anywhere in the library; `rcdeploy.cli` prints `error: <message>` and exits 2,
    without a traceback. Messages should name what was looked at and what fixes it.
    """


class VerificationError(Exception):
    """An exported file does not compute what the PyTorch model computes (exit 1)."""


class WorkerFailed(Exception):
    """A worker process of a multi-process job died or raised (exit 1); the others were stopped."""
