"""`mahir loadtest` fails when its requests failed: numbers measured on error answers (a wrong
path, a dead server) measure nothing, so they must never pass for a result. An LLM request's time
per output token is its own rate, however its tokens bunch up on the way."""

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


@pytest.mark.parametrize("url", ["notaurl", "127.0.0.1:8000", "ftp://host", "http://"])
def test_a_url_that_is_no_servers_address_is_refused_in_one_line(url: str) -> None:
    done = cli("loadtest", url, "--concurrency", "2", "--requests", "20")
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert lines == [
        f"error: {url!r} is not a server's address: give one such as http://127.0.0.1:8000"
    ]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (("--concurrency", "0"), "--concurrency must be >= 1, got 0"),
        (("--rate", "0"), "--rate must be > 0, got 0"),
        (("--rate", "-2"), "--rate must be > 0, got -2"),
        (("--concurrency", "2", "--duration", "0"), "--duration must be > 0, got 0"),
        (("--concurrency", "2", "--requests", "0"), "--requests must be >= 1, got 0"),
        (("--concurrency", "2", "--sentences", "0"), "--sentences must be >= 1, got 0"),
        (("--concurrency", "2", "--llm", "--max-tokens", "0"), "--max-tokens must be >= 1, got 0"),
        (("--concurrency", "2", "--llm", "--itl-ms", "0"), "--itl-ms must be > 0, got 0"),
        (("--concurrency", "2", "--json", "/proc/l.json"), "--json /proc/l.json: cannot create"),
    ],
)
def test_a_count_or_rate_out_of_range_is_refused_before_any_request(
    flags: tuple[str, ...], message: str
) -> None:
    """Zero clients or a rate of zero once passed for "not given" and ran a load anyway."""
    done = cli("loadtest", "http://127.0.0.1:9", *flags)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"error: {message}")


@pytest.mark.parametrize(("failed", "passes"), [(1, True), (2, True), (3, False)])
def test_failures_are_allowed_up_to_the_share_given(failed: int, passes: bool) -> None:
    result = LoadResult(LoadConfig("http://x", concurrency=1, max_error_rate=0.01))
    result.statuses = Counter({"200": 200 - failed, "503": failed})
    if passes:
        result.check()
    else:
        with pytest.raises(TooManyErrors, match="3 of 200 requests failed \\(503: 3\\)"):
            result.check()


def test_an_llm_requests_time_per_token_is_its_own_rate_whatever_its_bursts() -> None:
    """Four tokens: the first at 100 ms, the next two read at once 10 ms later, the last at
    310 ms. The gaps between chunks read 10, 0 and 200 ms; per token after the first, the
    request ran at (310 - 100) / 3 = 70 ms, and that is what goodput bounds."""
    from mahir.serve.llm_loadtest import LlmLoad, LlmLoadResult, _record

    result = LlmLoadResult(LoadConfig("http://x", concurrency=1))
    _record(result, LlmLoad(itl_ms=69.0), 0.0, [0.100, 0.110, 0.110, 0.310], tokens=4)
    assert result.ttft_ms == pytest.approx([100.0])
    assert result.itl_ms == pytest.approx([10.0, 0.0, 200.0])
    assert result.tpot_ms == pytest.approx([70.0])
    assert result.good == 0  # 70 ms a token is over the 69 asked
    _record(result, LlmLoad(itl_ms=71.0), 0.0, [0.100, 0.310], tokens=4)  # a chunk of three
    assert result.tpot_ms == pytest.approx([70.0, 70.0])
    assert result.good == 1
    _record(result, LlmLoad(), 0.0, [0.100], tokens=1)  # one token: no rate after the first
    assert result.tpot_ms == pytest.approx([70.0, 70.0])
    assert result.summary()["tpot_p50_ms"] == pytest.approx(70.0)
