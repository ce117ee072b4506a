"""Native stderr kept aside: what C code writes to descriptor 2 in the block shows only when
the block fails."""

from __future__ import annotations

import os

import pytest

from mahir.silence import native_stderr_kept


def test_native_stderr_is_kept_aside_unless_the_block_fails(
    capfd: pytest.CaptureFixture[str],
) -> None:
    with native_stderr_kept():
        os.write(2, b"profiler_start\n")
    os.write(2, b"after\n")
    assert capfd.readouterr().err == "after\n"
    with pytest.raises(RuntimeError):
        _fail_after_writing(b"why it failed\n")
    assert "why it failed" in capfd.readouterr().err


def _fail_after_writing(text: bytes) -> None:
    with native_stderr_kept():
        os.write(2, text)
        raise RuntimeError("failed")
