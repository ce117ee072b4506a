"""Numbers a person can trust: the load other processes put on the machine while timing is
measured and reported, and speedups shown side by side come from the same timing round."""

from __future__ import annotations

import subprocess
import sys
import time
from typing import Any

import numpy as np
import pytest

from mahir.measure import BUSY_CORES, MachineLoad, MeasureConfig, load_summary, measure
from mahir.recipe import Recipe
from mahir.report.html import render_html
from mahir.report.schema import Report
from mahir.report.verdicts import pareto_front
from mahir.search.candidates import Candidate
from mahir.search.halving import Outcome, comparable_speedup
from mahir.search.records import outcome_record
from mahir.types import CPU, Inputs, Outputs, Perf

SPIN = "import time\nend = time.monotonic() + 30\nwhile time.monotonic() < end: pass\n"


class IdleSession:
    """Waits without computing, so the process itself uses no CPU while it is timed."""

    runtime = "idle"
    device = CPU

    def run(self, inputs: Inputs) -> Outputs:
        time.sleep(0.002)  # the thing being timed: a session that waits, not a test's wait
        return {"y": inputs["x"]}

    def describe(self) -> dict[str, Any]:
        return {}


def test_another_busy_process_shows_in_the_timing() -> None:
    spinner = subprocess.Popen([sys.executable, "-c", SPIN])
    try:
        config = MeasureConfig(warmup_runs=0, min_time_s=0.5, min_runs=5, round_time_s=0.1)
        perf = measure({"idle": IdleSession()}, [{"x": np.zeros((1, 2))}], config)["idle"]
    finally:
        spinner.kill()
        spinner.wait()
    assert perf.other_load > 0.5  # one spinning process keeps about one core busy
    assert load_summary([perf])["busy"]


def test_this_process_own_work_is_not_counted_as_other_load() -> None:
    readings = {"machine": 100.0, "own": 10.0, "now": 0.0}
    load = MachineLoad(
        machine_seconds=lambda: readings["machine"],
        own_seconds=lambda: readings["own"],
        clock=lambda: readings["now"],
    )
    # 2 s of wall time: this process used 3.6 core-seconds, the machine 4.0 in all
    readings.update(machine=104.0, own=13.6, now=2.0)
    assert load.other_cores() == pytest.approx(0.2)
    readings.update(machine=104.0, own=14.5)  # counters read apart: never below zero
    assert load.other_cores() == 0.0


def perf(p50: float, other_load: float = 0.0) -> Perf:
    return Perf(1, (p50,), p50, p50, p50, 1000 / p50, None, 0.0, False, other_load)


def timed(cid: str, rounds: list[tuple[float, float]], cosine: float = 1.0) -> Outcome:
    """An outcome timed in len(rounds) rounds of (its p50, the baseline's p50 beside it)."""
    from mahir.types import OutputFidelity, Quality

    last_p50, last_base = rounds[-1]
    fidelity = OutputFidelity(0.0, 0.0, cosine, cosine)
    return Outcome(
        Candidate(cid, cid, Recipe((), "onnxruntime")),
        "ok",
        quality=Quality({"y": fidelity}),
        perf={1: perf(last_p50)},
        baseline_perf={1: perf(last_base)},
        rounds=len(rounds),
        speedups=[base / p50 for p50, base in rounds],
    )


def test_a_loser_is_shown_against_the_winner_of_its_own_round() -> None:
    # Round 1 ran while the baseline stalled (every speedup ~40x); round 2 on a quiet machine.
    winner = timed("winner", [(1.0, 40.0), (1.0, 14.0)], cosine=0.99)
    loser = timed("loser", [(1.2, 40.0)], cosine=0.999)  # 33.3x in round 1, 1.2x the winner's
    assert loser.speedup("latency") == pytest.approx(40.0 / 1.2)
    shown = comparable_speedup(loser, winner, "latency")
    assert shown == pytest.approx(14.0 / 1.2)  # 1.2x slower than the winner, as in round 1
    assert comparable_speedup(winner, winner, "latency") == pytest.approx(14.0)
    records = [outcome_record(o, "latency", winner) for o in (winner, loser)]
    assert [r.speedup for r in records] == pytest.approx([14.0, 14.0 / 1.2])
    assert records[1].speedup_measured == pytest.approx(40.0 / 1.2)
    # the winner is on the front; the loser too, as the more faithful and slower pick
    assert pareto_front(records) == ["winner", "loser"]


def test_a_busy_machine_is_said_in_the_report() -> None:
    quiet = load_summary([perf(1.0, 0.02), perf(2.0, 0.05)])
    assert not quiet["busy"]
    assert quiet["note"] is None
    busy = load_summary([perf(1.0, 0.1), perf(2.0, BUSY_CORES + 0.9)])
    assert busy["busy"]
    assert busy["other_cores_max"] == pytest.approx(BUSY_CORES + 0.9)
    assert "busy" in busy["note"]
    page = render_html(Report(machine_load=busy))
    assert "Busy machine." in page
    assert "Busy machine." not in render_html(Report(machine_load=quiet))
