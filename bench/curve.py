"""Serving throughput and latency across concurrency, against MLServer in the same run.

The MLP and the request of bench/serve.py (64 -> 256 -> 10, batch-1 FP32 raw ModelInfer), served
three ways one after the other on this machine: our inference service with its defaults (dynamic
batching: up to 32 rows, 0.5 ms queue delay), our service with batching off
(`--max-batch-size 1`), and MLServer with its defaults. Each is driven by the same load
generator at each concurrency level (closed loop: every client keeps one request in flight),
`--seconds` per level after a second of warm-up. Prints a table of requests/s, p50 and p99 per
server and level, the mean batch our batcher ran at each level, and one line per level

    serve_curve concurrency=C ratio_vs_mlserver=X p99_ratio=Y    ours (defaults) over MLServer

    python -m bench.curve [--levels 1,4,16,64] [--seconds 10] [--only-ours]
                          [--load h2load|threads] [--mlserver PATH]
"""

from __future__ import annotations

import argparse
import functools
import sys
import tempfile
import urllib.request
from collections.abc import Callable, Sequence

from prometheus_client.parser import text_string_to_metric_families

from bench import load, servers
from bench.load import Drive

Sweep = dict[int, Drive]


def batch_totals(metrics_url: str) -> tuple[float, float]:
    """Rows and batches our service's batcher has run for the MLP so far."""
    with urllib.request.urlopen(metrics_url, timeout=10) as response:
        text = response.read().decode()
    totals = {"sum": 0.0, "count": 0.0}
    for family in text_string_to_metric_families(text):
        if family.name != "weightsync_inference_batch_size":
            continue
        for sample in family.samples:
            kind = sample.name.rsplit("_", 1)[-1]
            if kind in totals and sample.labels.get("model") == "mlp":
                totals[kind] = sample.value
    return totals["sum"], totals["count"]


def sweep(
    drive: Callable[[str, float, int], Drive],
    address: str,
    levels: Sequence[int],
    seconds: float,
    metrics_url: str | None = None,
) -> tuple[Sweep, dict[int, float]]:
    """Drive `address` at each concurrency level; with `metrics_url`, also the mean batch."""
    seen: Sweep = {}
    batches: dict[int, float] = {}
    for level in levels:
        drive(address, 1, level)  # warm: connections, the allocator, the batcher's rhythm
        before = batch_totals(metrics_url) if metrics_url else (0.0, 0.0)
        seen[level] = drive(address, seconds, level)
        if metrics_url:
            rows, runs = (a - b for a, b in zip(batch_totals(metrics_url), before, strict=True))
            batches[level] = rows / runs if runs else 0.0
    return seen, batches


def cell(drive: Drive) -> str:
    return f"{drive.rps:,.0f} | {drive.p50 * 1e3:.2f} | {drive.p99 * 1e3:.2f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--levels", default="1,4,16,64", help="concurrency levels, commas")
    parser.add_argument("--seconds", type=float, default=10.0, help="per level and server")
    parser.add_argument("--mlserver", help="path of an `mlserver` executable to use")
    parser.add_argument("--only-ours", action="store_true", help="skip MLServer")
    parser.add_argument("--load", choices=load.GENERATORS, default=load.DEFAULT)
    args = parser.parse_args()
    levels = [int(level) for level in args.levels.split(",")]
    drive = functools.partial(load.drive_with, args.load)
    with tempfile.TemporaryDirectory() as tmp:
        env = servers.mlp_env(tmp)
        with servers.ours(tmp, env) as server:
            ours, batch = sweep(drive, server.address, levels, args.seconds, server.metrics_url)
        with servers.ours(tmp, env, "--max-batch-size", "1") as server:
            unbatched, _ = sweep(drive, server.address, levels, args.seconds)
        theirs: Sweep = {}
        if not args.only_ours:
            with servers.mlserver(tmp, env, args.mlserver) as address:
                theirs, _ = sweep(drive, address, levels, args.seconds)

    failed = sum(d.failed for run in (ours, unbatched, theirs) for d in run.values())
    print(
        f"# load generator: {args.load}, {args.seconds:g}s per level; req/s | p50 ms | p99 ms; "
        f"{failed} requests failed at the HTTP/2 level"
    )
    header = "| concurrency | ours (defaults) | | | mean batch | ours, batching off | | |"
    rule = "|---|---|---|---|---|---|---|---|"
    if theirs:
        header += " MLServer | | |"
        rule += "---|---|---|"
    print(header)
    print(rule)
    for level in levels:
        row = f"| {level} | {cell(ours[level])} | {batch[level]:.1f} | {cell(unbatched[level])} |"
        if theirs:
            row += f" {cell(theirs[level])} |"
        print(row)
    for level in levels if theirs else ():
        print(
            f"serve_curve concurrency={level} "
            f"ratio_vs_mlserver={ours[level].rps / theirs[level].rps:.2f} "
            f"p99_ratio={ours[level].p99 / theirs[level].p99:.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
