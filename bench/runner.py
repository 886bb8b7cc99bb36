"""Runs the side-by-side speed benchmark: every measurement (nash and the Python peers) in its own pinned
process, one at a time; collects the JSON records, writes bench/results/<timestamp>.{json,md} and prints the
tables. Standard library only, so it runs (and reports the peers as n/a) even without bench/.venv.
Called by bench/run.sh, which sets up the venv and builds nash first."""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import compare

FRAMEWORKS = ("nash", "tensorflow", "jax", "pytorch")
WORKLOADS = ("autoencoder", "mlp_gan", "dcgan")
#: Steps per timed run at batch 64, width 1: a run lasts about 0.5 s or more on the Python peers.
BASE_STEPS = {"autoencoder": 1500, "mlp_gan": 150, "dcgan": 10}
CURVE_BATCHES = (16, 32, 64, 128, 256, 512, 1024)
CURVE_WIDTHS = (0.5, 1.0, 2.0, 4.0)
DEFAULT_BATCH = 64
DEFAULT_WIDTH = 1.0
WARMUP = 20
REPEATS = 5
QUICK_REPEATS = 3
CURVE_REPEATS = 3
#: Seconds one measurement may take before it is stopped and reported as n/a.
TIMEOUT_S = 600
#: A multi-thread measurement is repeated (up to LINK_RETRIES times, LINK_WAIT_S apart) when the round trip of a
#: cache line between its CPUs (`nash bench cores`, probed before and after it) was more than LINK_FACTOR times the
#: run's usual one, or less than its inverse. On the virtual machines measured here the host moves the two CPUs
#: apart (60-160 ns becomes 300-520 ns) or onto one core (about 30 ns) for seconds to minutes, and every framework's
#: two-thread speed changes with it (docs/performance.md): the comparison is made at the machine's usual link, and a
#: measurement that never got it is marked. The usual link is the lower quartile of every probe so far: the far
#: periods are the minority of the time but can last through the first probes, which the median would then take
#: for the usual state; after the plan every measurement is judged again against all of the run's probes.
LINK_FACTOR = 1.6
LINK_RETRIES = 3
LINK_WAIT_S = 15.0
#: Probes taken at the start, a second apart, before the first multi-thread measurement.
LINK_BASELINE_PROBES = 10


@dataclass(frozen=True)
class Point:
    """One measurement to make."""

    framework: str
    workload: str
    threads: int
    batch: int
    width: float
    warmup: int
    steps: int
    repeats: int


def _csv(allowed: tuple[str, ...] | None, cast: type = str):
    def parse(text: str) -> list[Any]:
        items = [cast(t.strip()) for t in text.split(",") if t.strip()]
        if not items:
            raise argparse.ArgumentTypeError("needs at least one value")
        if allowed is not None:
            bad = [i for i in items if i not in allowed]
            if bad:
                raise argparse.ArgumentTypeError(f"unknown {bad}; valid: {', '.join(allowed)}")
        return items

    return parse


def _threads(text: str) -> list[int]:
    values = _csv(None, int)(text)
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"thread counts must be >= 1, got {text}")
    return values


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Side-by-side speed benchmark of nash and its Python peers.")
    p.add_argument("--quick", action="store_true", help="1 thread, fewer steps and repeats (a fast check)")
    p.add_argument("--curve", action="store_true", help="add the cost curves (batch 16..1024, width 0.5..4)")
    p.add_argument("--threads", type=_threads, default=None, help="comma-separated thread counts (default 1,2)")
    p.add_argument("--workloads", type=_csv(WORKLOADS), default=list(WORKLOADS), help="comma-separated workloads")
    p.add_argument(
        "--rounds",
        type=_positive,
        default=1,
        help="run every measurement this many times, one round of all of them after another, and merge each "
        "measurement's timed runs (a slow period of the machine then falls on every framework of a row, not one)",
    )
    p.add_argument("--dry-run", action="store_true", help="print the planned commands and exit")
    p.add_argument("--nash", type=Path, required=True, help="the nash binary")
    p.add_argument("--python", type=Path, required=True, help="the venv's python (may be missing: peers are n/a)")
    p.add_argument("--results", type=Path, required=True, help="folder for <timestamp>.{json,md}")
    ns = p.parse_args(argv)
    if ns.threads is None:
        ns.threads = [1] if ns.quick else [1, 2]
    return ns


def _steps(workload: str, batch: int, width: float, quick: bool) -> int:
    """Steps per run, scaled down with the work per step (about linear in batch, quadratic in width)."""
    steps = BASE_STEPS[workload] * DEFAULT_BATCH / batch / width**2
    if quick:
        steps /= 3
    return max(3, round(steps))


def plan(args: argparse.Namespace) -> list[Point]:
    """The main table's points, then (with --curve) the cost curve's, at the first thread count."""
    repeats = QUICK_REPEATS if args.quick else REPEATS
    points: list[Point] = []
    for workload in args.workloads:
        for threads in args.threads:
            for fw in FRAMEWORKS:
                steps = _steps(workload, DEFAULT_BATCH, DEFAULT_WIDTH, args.quick)
                points.append(Point(fw, workload, threads, DEFAULT_BATCH, DEFAULT_WIDTH, WARMUP, steps, repeats))
    if args.curve:
        threads = args.threads[0]
        shape = [(b, DEFAULT_WIDTH) for b in CURVE_BATCHES] + [(DEFAULT_BATCH, w) for w in CURVE_WIDTHS]
        for workload in args.workloads:
            for batch, width in shape:
                if (batch, width) == (DEFAULT_BATCH, DEFAULT_WIDTH):
                    continue  # the main table's point
                for fw in FRAMEWORKS:
                    steps = _steps(workload, batch, width, True)
                    warmup = min(WARMUP, steps)  # enough for the compilation at the first step
                    points.append(Point(fw, workload, threads, batch, width, warmup, steps, CURVE_REPEATS))
    return points


def _command(point: Point, args: argparse.Namespace) -> list[str]:
    cpus = ",".join(str(c) for c in range(point.threads))
    common = [
        "--workload", point.workload, "--threads", str(point.threads), "--batch", str(point.batch),
        "--width", str(point.width), "--warmup", str(point.warmup), "--steps", str(point.steps),
        "--repeats", str(point.repeats),
    ]  # fmt: skip
    if point.framework == "nash":
        return ["taskset", "-c", cpus, str(args.nash), "bench", "speed", *common, "--json"]
    peer = Path(__file__).resolve().parent / "peers" / "peer.py"
    return ["taskset", "-c", cpus, str(args.python), str(peer), "--framework", point.framework, *common]


def _failure(point: Point, reason: str) -> dict[str, Any]:
    return {
        "framework": point.framework,
        "workload": point.workload,
        "threads": point.threads,
        "batch": point.batch,
        "width": point.width,
        "error": reason,
    }


def _parse_records(stdout: str) -> list[dict[str, Any]]:
    """The whole stdout as JSON (nash's array, perhaps pretty-printed), else its last line (a peer's object)."""
    text = stdout.strip()
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError:
        parsed = json.loads(text.splitlines()[-1])
    records = parsed if isinstance(parsed, list) else [parsed]
    for r in records:
        if not isinstance(r, dict) or not {"framework", "median", "min", "peak_rss_mb"} <= r.keys():
            raise ValueError(f"not a benchmark record: {str(r)[:200]}")
    return records


def _mb(value: float | None) -> str:
    return "?" if value is None else f"{value:.0f}"


def run_point(point: Point, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Runs one measurement; any failure becomes a record with an `error` (shown as n/a), never an exception."""
    if point.framework != "nash" and not args.python.exists():
        return [_failure(point, "bench/.venv missing; run bench/setup-venv.sh")]
    if point.framework == "nash" and not args.nash.exists():
        return [_failure(point, f"{args.nash} missing; run cargo build --release")]
    try:
        proc = subprocess.run(_command(point, args), check=False, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return [_failure(point, f"timed out after {TIMEOUT_S} s")]
    except OSError as e:
        return [_failure(point, f"could not start: {e}")]
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
        last = lines[-1].strip() if lines else f"exit status {proc.returncode}"
        if point.framework != "nash" and proc.returncode == 3:
            last = f"not installed: {last}"
        return [_failure(point, last[:300])]
    try:
        return _parse_records(proc.stdout)
    except (ValueError, IndexError) as e:
        return [_failure(point, f"unreadable output ({e})")]


def probe_link(cpus: str, args: argparse.Namespace) -> float | None:
    """The round trip of a cache line between the first two of `cpus` in ns (`nash bench cores`), None if it
    cannot be measured (no nash binary, one CPU, not Linux)."""
    try:
        proc = subprocess.run(
            ["taskset", "-c", cpus, str(args.nash), "bench", "cores", "--json"],
            check=False,
            capture_output=True,
            text=True,
            timeout=60,
        )
        return float(json.loads(proc.stdout)["round_trip_ns"]) if proc.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired, ValueError, KeyError, TypeError):
        return None


class LinkWatch:
    """The probes of the run so far, and whether a measurement's probes are unusual against them."""

    def __init__(self) -> None:
        self.probes: list[float] = []

    def add(self, *values: float | None) -> None:
        self.probes += [v for v in values if v is not None]

    def usual(self) -> float | None:
        """The lower quartile of the probes so far."""
        if not self.probes:
            return None
        ordered = sorted(self.probes)
        return ordered[(len(ordered) - 1) // 4]

    def unusual(self, *values: float | None) -> bool:
        typical = self.usual()
        if typical is None:
            return False
        return any(v is not None and not typical / LINK_FACTOR <= v <= typical * LINK_FACTOR for v in values)


def run_watched(point: Point, args: argparse.Namespace, watch: LinkWatch) -> list[dict[str, Any]]:
    """`run_point`, with the core link probed before and after a multi-thread measurement, which is repeated while
    the probes are unusual (LINK_FACTOR); the records carry `core_round_trip_ns` (every probe of the kept attempt)
    and, where no attempt got a usual link, `link_unusual`."""
    if point.threads < 2:
        return run_point(point, args)
    cpus = ",".join(str(c) for c in range(point.threads))
    for attempt in range(LINK_RETRIES + 1):
        before = probe_link(cpus, args)
        got = run_point(point, args)
        after = probe_link(cpus, args)
        watch.add(before, after)
        unusual = watch.unusual(before, after)
        for r in got:
            r["core_round_trip_ns"] = [v for v in (before, after) if v is not None]
            if unusual:
                r["link_unusual"] = True
        if not unusual or attempt == LINK_RETRIES:
            return got
        print(
            f" link {before or 0:.0f}/{after or 0:.0f} ns against a usual {watch.usual():.0f} ns: "
            f"again in {LINK_WAIT_S:.0f} s ...",
            end="",
            file=sys.stderr,
            flush=True,
        )
        time.sleep(LINK_WAIT_S)
    return got


def rejudge_links(records: list[dict[str, Any]], watch: LinkWatch) -> None:
    """Marks anew which multi-thread records were measured at a far link (`link_unusual`), against the usual link of
    every probe of the run: one that began in a far period took the far link for the usual one until near probes
    outnumbered it, and judged its first measurements (and near ones, as unusual) against that."""
    for r in records:
        probes = r.get("core_round_trip_ns")
        if "error" in r or not probes:
            continue
        if watch.unusual(*probes):
            r["link_unusual"] = True
        else:
            r.pop("link_unusual", None)


def _only_far(records: list[dict[str, Any]], point: Point) -> bool:
    """Whether `point`'s successful records are all marked `link_unusual` (and there is at least one)."""
    mine = [
        r
        for r in records
        if "error" not in r
        and r["framework"] == point.framework
        and r["workload"] == point.workload
        and int(r["threads"]) == point.threads
        and int(r["batch"]) == point.batch
        and float(r["width"]) == point.width
    ]
    return bool(mine) and all(r.get("link_unusual") for r in mine)


def _key(record: dict[str, Any]) -> tuple[Any, ...]:
    return (
        record["framework"],
        record["workload"],
        int(record["threads"]),
        int(record["batch"]),
        float(record["width"]),
    )


def at_usual_link_where_measured(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`records` without the successful ones measured at a far core link (`link_unusual`) of every measurement that
    also has a successful record at the usual link: merging a far round's runs into a usual round's would mix two
    speeds (at 2 threads a far link costs the dense workloads up to 40%)."""
    usual = {_key(r) for r in records if "error" not in r and not r.get("link_unusual")}
    return [r for r in records if "error" in r or not r.get("link_unusual") or _key(r) not in usual]


def merge_rounds(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per measurement from the records of several rounds: the timed runs of every round that ran
    (only those at the usual core link where there are any: `at_usual_link_where_measured`), their median and
    minimum, the largest peak memory, `rounds` the number merged; a measurement that failed in every round keeps
    its first failure. nash's GFLOP/s and share of the matrix-product peak are recomputed from the merged
    medians."""
    merged: dict[tuple[Any, ...], dict[str, Any]] = {}
    for r in at_usual_link_where_measured(records):
        key = _key(r)
        have = merged.get(key)
        if have is None or ("error" in have and "error" not in r):
            merged[key] = {**r, "steps_per_s": list(r.get("steps_per_s", [])), "rounds": 0 if "error" in r else 1}
        elif "error" not in r:
            have["steps_per_s"] += r.get("steps_per_s", [])
            have["rounds"] += 1
            if "core_round_trip_ns" in r:
                have["core_round_trip_ns"] = have.get("core_round_trip_ns", []) + r["core_round_trip_ns"]
            if r.get("link_unusual"):
                have["link_unusual"] = True
            peaks = [m for m in (have.get("peak_rss_mb"), r.get("peak_rss_mb")) if m is not None]
            have["peak_rss_mb"] = max(peaks) if peaks else None
    out = list(merged.values())
    for r in out:
        runs = r.get("steps_per_s") or []
        if "error" in r or not runs:
            continue
        r["median"], r["min"] = statistics.median(runs), min(runs)
        if r.get("gflop_per_step") is not None:
            r["gflops"] = r["gflop_per_step"] * r["median"]
    peaks = {int(r["threads"]): r.get("gflops") for r in out if r["workload"] == compare.MATMUL_WORKLOAD}
    for r in out:
        peak = peaks.get(int(r["threads"]))
        if r.get("percent_of_matmul_peak") is not None and r.get("gflops") and peak:
            r["percent_of_matmul_peak"] = 100.0 * r["gflops"] / peak
    return out


def main() -> int:
    args = parse_args()
    points = plan(args)
    if args.dry_run:
        for point in points:
            print(" ".join(_command(point, args)))
        return 0
    records: list[dict[str, Any]] = []
    started = time.time()
    total = len(points) * args.rounds
    watch = LinkWatch()
    multi = sorted({p.threads for p in points if p.threads > 1})
    if multi:
        cpus = ",".join(str(c) for c in range(multi[0]))
        for _ in range(LINK_BASELINE_PROBES):
            watch.add(probe_link(cpus, args))
            time.sleep(1.0)
        usual = watch.usual()
        print(
            f"core link (CPUs {cpus}): {'unknown' if usual is None else f'{usual:.0f} ns'} per round trip",
            file=sys.stderr,
        )
    for n, point in enumerate((p for _ in range(args.rounds) for p in points), 1):
        label = f"{point.framework} {point.workload} threads={point.threads} batch={point.batch} width={point.width}"
        print(f"[{n}/{total}] {label} ...", end="", file=sys.stderr, flush=True)
        got = run_watched(point, args, watch)
        records.extend(got)
        summary = "; ".join(
            f"n/a ({r['error']})"
            if "error" in r
            else f"{r['workload']} {r['median']:.1f} steps/s, {_mb(r.get('peak_rss_mb'))} MB"
            for r in got
        )
        print(f" {summary}", file=sys.stderr, flush=True)
    # Multi-thread measurements that never got the usual link (judged over the whole run's probes; every attempt
    # far, which long far periods do) run once more at the end, when the link may be back; the merge keeps only
    # rounds at the usual link.
    rejudge_links(records, watch)
    far = [p for p in points if p.threads > 1 and _only_far(records, p)]
    for n, point in enumerate(far, 1):
        label = f"{point.framework} {point.workload} threads={point.threads} batch={point.batch} width={point.width}"
        print(f"[far link, again {n}/{len(far)}] {label} ...", end="", file=sys.stderr, flush=True)
        got = run_watched(point, args, watch)
        records.extend(got)
        usual = any("error" not in r and not r.get("link_unusual") for r in got)
        print(f" {'at the usual link' if usual else 'far again'}", file=sys.stderr, flush=True)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(started))
    args.results.mkdir(parents=True, exist_ok=True)
    json_path = args.results / f"{stamp}.json"
    md_path = args.results / f"{stamp}.md"
    if args.rounds > 1 or far:
        records = merge_rounds(records)
    json_path.write_text(json.dumps(records, indent=1) + "\n")
    report = compare.render(records, curve=args.curve)
    md_path.write_text(report)
    print(report)
    print(f"records: {json_path}\nreport:  {md_path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
