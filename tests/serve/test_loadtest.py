"""`mahir loadtest` fails when its requests failed: numbers measured on error answers (a wrong
path, a dead server) measure nothing, so they must never pass for a result."""

from __future__ import annotations

import json
import socket
from collections import Counter
from pathlib import Path

import pytest

from mahir.serve.loadtest import LoadConfig, LoadResult, TooManyErrors
from tests.helpers import cli


def test_a_dead_url_fails_the_run_and_says_why(tmp_path: Path) -> None:
    with socket.socket() as free:  # bound, never listening, closed: nothing answers there
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    out = tmp_path / "load.json"
    done = cli(
        "loadtest", f"http://127.0.0.1:{port}", "--concurrency", "2", "--requests", "20",
        "--json", str(out),
    )  # fmt: skip
    assert done.returncode == 1
    assert "20 of 20 requests failed (ClientConnectorError: 20)" in done.stderr
    assert json.loads(out.read_text())["ok"] == 0  # the summary is still written


@pytest.mark.parametrize(("failed", "passes"), [(1, True), (2, True), (3, False)])
def test_failures_are_allowed_up_to_the_share_given(failed: int, passes: bool) -> None:
    result = LoadResult(LoadConfig("http://x", concurrency=1, max_error_rate=0.01))
    result.statuses = Counter({"200": 200 - failed, "503": failed})
    if passes:
        result.check()
    else:
        with pytest.raises(TooManyErrors, match="3 of 200 requests failed \\(503: 3\\)"):
            result.check()
