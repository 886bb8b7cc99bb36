"""Renders benchmark records (the JSON contract, plus `error` records for what could not run) as markdown:
the side-by-side table with ratios and targets, and optionally the cost curves.

    python bench/compare.py bench/results/<timestamp>.json [--curve]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, TypeGuard

PEERS = ("tensorflow", "jax", "pytorch")
FRAMEWORKS = ("nash", *PEERS)
#: Targets of the issue: nash at least this many times the fastest peer's steps/s ...
SPEED_TARGET = 1.2
#: ... and a peak resident set at most this share of the leanest peer's.
MEMORY_TARGET = 1 / 5
#: The autoencoder's achieved GFLOP/s as a percentage of nash's matrix-product peak (nash reports both).
MATMUL_SHARE_TARGET = 80.0
#: The `workload` of nash's matrix-product peak records.
MATMUL_WORKLOAD = "matmul_peak"
WORKLOADS = ("autoencoder", "mlp_gan", "dcgan")
DEFAULT_BATCH = 64
DEFAULT_WIDTH = 1.0

Record = dict[str, Any]
Key = tuple[str, int, int, float]  # workload, threads, batch, width


def _index(records: list[Record]) -> dict[Key, dict[str, Record]]:
    """Records by (workload, threads, batch, width), then framework (the last record of a kind wins)."""
    out: dict[Key, dict[str, Record]] = {}
    for r in records:
        key = (r["workload"], int(r["threads"]), int(r["batch"]), float(r["width"]))
        out.setdefault(key, {})[r["framework"]] = r
    return out


def _ok(r: Record | None) -> TypeGuard[Record]:
    return r is not None and "error" not in r


def _speed_cell(r: Record | None) -> str:
    if r is None:
        return "n/a (not run)"
    if "error" in r:
        return f"n/a ({_escape(r['error'])})"
    mark = " †" if r.get("link_unusual") else ""
    return f"{r['median']:,.1f} ({r['min']:,.1f}){mark}"


def _escape(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _mem(r: Record | None) -> float | None:
    """The record's peak resident set in MB, None where it is unknown (nash writes null where it cannot read it)."""
    if not _ok(r) or r.get("peak_rss_mb") is None:
        return None
    return float(r["peak_rss_mb"])


def _targets(nash: Record, fastest: Record | None, leanest: Record | None) -> tuple[str, str, str]:
    """The speed ratio, the memory ratio and the targets cell for nash's record."""
    speed = mem = "n/a"
    marks = []
    if fastest is not None:
        s_ratio = nash["median"] / fastest["median"]
        speed = f"{s_ratio:.2f}x (vs {fastest['framework']})"
        marks.append(f"speed {'met' if s_ratio >= SPEED_TARGET else 'MISSED'}")
    nash_mb, lean_mb = _mem(nash), _mem(leanest)
    if nash_mb is not None and lean_mb is not None and nash_mb > 0:
        m_ratio = nash_mb / lean_mb
        mem = f"{m_ratio:.2f} (1/{1 / m_ratio:.1f})"
        marks.append(f"memory {'met' if m_ratio <= MEMORY_TARGET else 'MISSED'}")
    share = nash.get("percent_of_matmul_peak")
    if share is not None:
        marks.append(f"{share:.0f}% of matmul peak {'met' if share >= MATMUL_SHARE_TARGET else 'MISSED'}")
    return speed, mem, ", ".join(marks) or "n/a"


def main_table(records: list[Record]) -> str:
    """workload | threads | nash | peers | ratios | memory | targets, at batch 64 and width 1."""
    rows = [
        (
            "| workload | threads | nash median (min) | tensorflow | jax | pytorch | nash / fastest peer "
            "| peak MB nash | leanest peer MB | memory ratio | targets |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (workload, threads, batch, width), by_fw in sorted(_index(records).items()):
        if workload not in WORKLOADS or (batch, width) != (DEFAULT_BATCH, DEFAULT_WIDTH):
            continue
        nash = by_fw.get("nash")
        peers = [by_fw[p] for p in PEERS if _ok(by_fw.get(p))]
        fastest = max(peers, key=lambda r: r["median"], default=None)
        leanest = min((r for r in peers if _mem(r) is not None), key=lambda r: r["peak_rss_mb"], default=None)
        speed, mem, targets = _targets(nash, fastest, leanest) if _ok(nash) else ("n/a", "n/a", "n/a")
        nash_mb, lean_mb = _mem(nash), _mem(leanest)
        cells = [
            workload,
            str(threads),
            _speed_cell(nash),
            *(_speed_cell(by_fw.get(p)) for p in PEERS),
            speed,
            f"{nash_mb:,.0f}" if nash_mb is not None else "n/a",
            f"{lean_mb:,.0f} ({leanest['framework']})" if leanest is not None and lean_mb is not None else "n/a",
            mem,
            targets,
        ]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def matmul_lines(records: list[Record]) -> str:
    """nash's matrix-product peak per thread count (its `matmul_peak` records), the autoencoder's yardstick."""
    by_threads: dict[int, Record] = {}
    for r in records:
        if _ok(r) and r["workload"] == MATMUL_WORKLOAD and r.get("gflops") is not None:
            by_threads.setdefault(int(r["threads"]), r)
    lines = [
        f"- {t} thread(s): {r['gflops']:,.1f} GFLOP/s ({r.get('notes', '')})" for t, r in sorted(by_threads.items())
    ]
    return "\n".join(lines)


def curve_tables(records: list[Record]) -> str:
    """Per workload: steps/s and samples/s (median) against batch at width 1, and against width at batch 64."""
    index = _index(records)
    parts = []
    for workload in sorted({k[0] for k in index if k[0] in WORKLOADS}):
        threads = min(k[1] for k in index if k[0] == workload)
        batches = sorted({k[2] for k in index if k[0] == workload and k[1] == threads and k[3] == DEFAULT_WIDTH})
        widths = sorted({k[3] for k in index if k[0] == workload and k[1] == threads and k[2] == DEFAULT_BATCH})
        header = " | ".join(f"{fw} steps/s | {fw} samples/s" for fw in FRAMEWORKS)
        sep = "|---" * (1 + 2 * len(FRAMEWORKS)) + "|"
        axes: list[tuple[str, str, list[tuple[float, Key]]]] = [
            ("batch", f"width {DEFAULT_WIDTH:g}", [(b, (workload, threads, b, DEFAULT_WIDTH)) for b in batches]),
            ("width", f"batch {DEFAULT_BATCH}", [(w, (workload, threads, DEFAULT_BATCH, w)) for w in widths]),
        ]
        for axis, fixed, points in axes:
            if len(points) < 2:
                continue
            parts.append(f"### {workload}: cost against {axis} ({threads} thread(s), {fixed})")
            parts.append(f"| {axis} | {header} |\n{sep}")
            for value, key in points:
                cells = []
                for fw in FRAMEWORKS:
                    r = index.get(key, {}).get(fw)
                    if _ok(r):
                        cells += [f"{r['median']:,.1f}", f"{r['median'] * r['batch']:,.0f}"]
                    else:
                        cells += ["n/a", "n/a"]
                parts.append(f"| {value:g} | " + " | ".join(cells) + " |")
            parts.append("")
    return "\n".join(parts)


def link_lines(records: list[Record]) -> str:
    """The core-link probes of the multi-thread measurements (bench/runner.py), and the measurements that never
    got the usual link."""
    probes = sorted(v for r in records if _ok(r) for v in r.get("core_round_trip_ns", []))
    if not probes:
        return ""
    unusual = [r for r in records if _ok(r) and r.get("link_unusual")]
    text = (
        f"Core link (`nash bench cores`, probed before and after each multi-thread measurement kept): lower "
        f"quartile {probes[(len(probes) - 1) // 4]:.0f} ns per cache-line round trip (the usual link), median "
        f"{probes[len(probes) // 2]:.0f}, range {probes[0]:.0f}-{probes[-1]:.0f}; a measurement whose probes were "
        "far from the usual link was repeated."
    )
    if unusual:
        names = ", ".join(f"{r['framework']} {r['workload']} {r['threads']}t" for r in unusual)
        text += f" † never measured at the usual link (its last attempt is shown): {names}."
    return text


def notes(records: list[Record]) -> str:
    """What each framework ran as (version, settings), once per distinct pair."""
    seen: dict[tuple[str, str, str], None] = {}
    for r in records:
        if "error" not in r:
            seen[(r["framework"], str(r.get("version", "")), str(r.get("notes", "")))] = None
    return "\n".join(f"- {fw} {version}: {note}" for fw, version, note in seen)


def render(records: list[Record], curve: bool) -> str:
    """The whole markdown report."""
    out = [
        "## Speed: steps/s, median (min) of the timed runs; batch 64, width 1, f32",
        "",
        main_table(records),
        "",
        (
            f"Targets: nash >= {SPEED_TARGET}x the fastest peer's median steps/s; nash's peak resident set <= "
            f"1/{round(1 / MEMORY_TARGET)} of the leanest peer's; the autoencoder at >= {MATMUL_SHARE_TARGET:.0f}% "
            "of the matrix-product peak measured in the same run."
        ),
        "",
    ]
    link = link_lines(records)
    if link:
        out += [link, ""]
    matmul = matmul_lines(records)
    if matmul:
        out += ["Matrix-product peak (nash, 1024x1024x1024 f32):", "", matmul, ""]
    if curve:
        out += ["## Cost curves (median steps/s and samples/s)", "", curve_tables(records)]
    out += ["## Frameworks", "", notes(records), ""]
    return "\n".join(out)


def main() -> int:
    p = argparse.ArgumentParser(description="Render benchmark records as markdown tables.")
    p.add_argument("records", type=Path, help="a JSON array of records (bench/results/<timestamp>.json)")
    p.add_argument("--curve", action="store_true", help="also render the cost curves")
    args = p.parse_args()
    try:
        records = json.loads(args.records.read_text())
    except (OSError, json.JSONDecodeError) as e:
        print(f"error: cannot read records from {args.records}: {e}", file=sys.stderr)
        return 2
    needed = {"framework", "workload", "threads", "batch", "width"}
    if not isinstance(records, list) or not all(isinstance(r, dict) and needed <= r.keys() for r in records):
        print(
            f"error: {args.records} must hold a JSON array of records, each with {', '.join(sorted(needed))}",
            file=sys.stderr,
        )
        return 2
    print(render(records, args.curve))
    return 0


if __name__ == "__main__":
    sys.exit(main())
