"""The CLI run in-process, as the tests drive it: exit code, stdout and stderr."""

from __future__ import annotations

import pytest

from rcdeploy.cli import main


def run_cli(argv: list, capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    """`rcdeploy ARGV` in this process: (exit code, stdout, stderr)."""
    try:
        main([str(a) for a in argv])
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err
