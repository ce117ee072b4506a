"""The report of benchmarks/gpu_serving.py: per server and concurrency, requests/s (the median
of the rounds) and p50/p99 over every request of the rounds pooled; mahir / Infinity ratios, and
each further worker count's against mahir's first; the targets of issue 15; a markdown table.
Plain functions over the report's dict."""

from __future__ import annotations

import json
from typing import Any

import numpy as np


def summarize(report: dict[str, Any], latencies: dict[tuple[str, int], list[np.ndarray]]) -> None:
    """Per server and level: the median of the rounds' requests/s, p50 and p99 over all their
    requests pooled; ratios mahir / Infinity; the targets."""
    summary: dict[str, dict[str, Any]] = {}
    for server, levels in report["loads"].items():
        for level, rounds in levels.items():
            pooled = latencies.get((server, int(level)), [])
            joined = np.concatenate(pooled) if pooled else np.array([])
            p50, p99 = np.percentile(joined, [50, 99]) if len(joined) else (np.nan, np.nan)
            summary.setdefault(server, {})[level] = {
                "requests_per_s": float(np.median([r["requests_per_s"] for r in rounds])),
                "p50_ms": float(p50),
                "p99_ms": float(p99),
                "rounds_requests_per_s": [round(r["requests_per_s"], 1) for r in rounds],
                "max_error_share": max(r["error_share"] for r in rounds),
            }
    report["summary"] = summary
    report["ratios_mahir_over_infinity"] = ratios(summary, "mahir", "infinity")
    others = [server for server in summary if server.startswith("mahir-")]  # more workers
    report["ratios_over_one_worker"] = {s: ratios(summary, s, "mahir") for s in others}
    report["targets"] = targets(summary)


def ratios(summary: dict[str, dict[str, Any]], ours: str, theirs: str) -> dict[str, Any]:
    """Per level both servers ran: requests/s, p50 and p99 of `ours` over `theirs`'."""
    found = {}
    for level, a in summary.get(ours, {}).items():
        b = summary.get(theirs, {}).get(level)
        if b:
            found[level] = {
                key: a[key] / b[key] if b[key] else None
                for key in ("requests_per_s", "p50_ms", "p99_ms")
            }
    return found


def targets(summary: dict[str, dict[str, Any]]) -> dict[str, Any]:
    ours, theirs = summary.get("mahir", {}), summary.get("infinity", {})
    found: dict[str, Any] = {}
    if "256" in ours and "256" in theirs:
        a, b = ours["256"], theirs["256"]
        found["c256 requests/s >= 2x Infinity's"] = a["requests_per_s"] >= 2 * b["requests_per_s"]
        found["c256 p99 no worse than Infinity's"] = a["p99_ms"] <= b["p99_ms"]
    if "1" in ours and "1" in theirs:
        found["c1 p50 no worse than Infinity's"] = ours["1"]["p50_ms"] <= theirs["1"]["p50_ms"]
    return found


def markdown(report: dict[str, Any]) -> str:
    machine = report.get("machine", {})
    gpu = report.get("versions", {}).get("mahir", {}).get("gpu") or machine.get("nvidia_smi")
    lines = [
        f"## mahir serve vs Infinity (torch engine) on {gpu or 'no GPU'} ({report['date'][:10]})",
        "",
        f"Host: {machine.get('host')}. Command: `{report['command']}`",
        "",
        f"mahir served: {report.get('served_recipe', {}).get('path', 'nothing')}; servers up: "
        f"{', '.join(report.get('servers_up', [])) or 'none'}",
        "",
        "| server | concurrency | requests/s | p50 ms | p99 ms | rounds (req/s) | errors |",
        "|---|---|---|---|---|---|---|",
    ]
    for server, levels in report.get("summary", {}).items():
        for level, row in sorted(levels.items(), key=lambda item: int(item[0])):
            lines.append(
                f"| {server} | {level} | {row['requests_per_s']:,.0f} | {row['p50_ms']:.2f} | "
                f"{row['p99_ms']:.2f} | {row['rounds_requests_per_s']} | "
                f"{row['max_error_share']:.1%} |"
            )
    compared = [("mahir / Infinity", report.get("ratios_mahir_over_infinity", {}))]
    compared += [(f"{s} / mahir", r) for s, r in report.get("ratios_over_one_worker", {}).items()]
    for title, found in compared:
        if not found:  # a server that did not run: no table
            continue
        lines += [
            "",
            f"| concurrency | req/s {title} | p50 ratio | p99 ratio |",
            "|---|---|---|---|",
        ]
        for level, ratio in sorted(found.items(), key=lambda i: int(i[0])):
            cells = " | ".join(f"{v:.2f}x" if v is not None else "-" for v in ratio.values())
            lines.append(f"| {level} | {cells} |")
    lines += [
        "",
        "Targets: "
        + (
            ", ".join(
                f"{k}: {'met' if v else 'NOT met'}" for k, v in report.get("targets", {}).items()
            )
            or "not measured"
        ),
    ]
    if "fidelity" in report:
        lines += ["", f"Embedding cosine (mean / worst): {json.dumps(report['fidelity'])}"]
    lines += [
        "",
        "Phases: "
        + "; ".join(
            f"{name} {p['status']} ({p['seconds']} s)" for name, p in report["phases"].items()
        ),
    ]
    for name, phase in report["phases"].items():
        if phase["status"] != "ok":
            lines.append(f"- {name}: {_gist(phase.get('error') or phase['status'])}")
    return "\n".join(lines) + "\n"


def _gist(error: str) -> str:
    """An error's first line (what failed) and its last (why: the end of a log's tail)."""
    said = [line.strip() for line in error.splitlines() if line.strip()]
    return said[0] if len(said) < 2 else f"{said[0]} ... {said[-1]}"
