"""What several test modules need: the real `mahir` command in a fresh process."""

from __future__ import annotations

import subprocess
import sys


def mahir(*args: str) -> subprocess.CompletedProcess[str]:
    """Run `python -m mahir.cli ARGS`, as a user's shell would, and capture what it printed."""
    return subprocess.run(
        [sys.executable, "-m", "mahir.cli", *args],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
