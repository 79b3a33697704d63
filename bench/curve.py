"""Serving throughput and latency across concurrency, against MLServer in the same run.

The MLP and the request of bench/serve.py (64 -> 256 -> 10, batch-1 FP32 raw ModelInfer), served
four ways one after the other on this machine: our inference service with its defaults (dynamic
batching: up to 32 rows, 0.5 ms queue delay), our service with batching off
(`--max-batch-size 1`), and MLServer with its defaults and with `parallel_workers: 0` (the model
in its own process). Each is driven by the same load generator at each concurrency level (closed
loop: every client keeps one request in flight), `--seconds` per level after a second of
warm-up. Prints a table of requests/s, p50 and p99 per server and level, the mean batch our
batcher ran at each level, and one line per level against MLServer's best there (the setting
with more requests/s)

    serve_curve concurrency=C ratio_vs_mlserver_best=X p99_ratio=Y    ours (defaults) over it

and draws requests/s and p99 against clients, ours and MLServer's best, to `--picture`
(default docs/serving_curve.png; matplotlib, from the `bench` extra).

    python -m bench.curve [--levels 1,2,4,8,16,32,64] [--seconds 10] [--only-ours]
                          [--load h2load|threads] [--mlserver PATH] [--picture PATH]
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
PICTURE = servers.ROOT / "docs" / "serving_curve.png"


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


def best_of(sweeps: Sequence[Sweep], levels: Sequence[int]) -> Sweep:
    """At each level, the sweep that served more requests/s there."""
    return {level: max((s[level] for s in sweeps), key=lambda d: d.rps) for level in levels}


def draw(path: str, levels: Sequence[int], ours: Sweep, theirs: Sweep, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (rate, tail) = plt.subplots(1, 2, figsize=(10, 4))
    for sweep, label, style in ((ours, "ours", "o-"), (theirs, "MLServer, its best", "s--")):
        if not sweep:
            continue
        rate.plot(levels, [sweep[n].rps for n in levels], style, label=label)
        tail.plot(levels, [sweep[n].p99 * 1e3 for n in levels], style, label=label)
    for axes, name in ((rate, "requests/s"), (tail, "p99 latency (ms)")):
        axes.set_xscale("log", base=2)
        axes.set_xticks(list(levels), [str(n) for n in levels])
        axes.set_xlabel("clients (one request in flight each)")
        axes.set_ylabel(name)
        axes.grid(True, alpha=0.3)
        axes.legend()
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--levels", default="1,2,4,8,16,32,64", help="concurrency levels")
    parser.add_argument("--seconds", type=float, default=10.0, help="per level and server")
    parser.add_argument("--mlserver", help="path of an `mlserver` executable to use")
    parser.add_argument("--only-ours", action="store_true", help="skip MLServer")
    parser.add_argument("--load", choices=load.GENERATORS, default=load.DEFAULT)
    parser.add_argument("--picture", default=str(PICTURE), help="where to draw the curve")
    args = parser.parse_args()
    levels = [int(level) for level in args.levels.split(",")]
    drive = functools.partial(load.drive_with, args.load)
    with tempfile.TemporaryDirectory() as tmp:
        env = servers.mlp_env(tmp)
        with servers.ours(tmp, env) as server:
            ours, batch = sweep(drive, server.address, levels, args.seconds, server.metrics_url)
        with servers.ours(tmp, env, "--max-batch-size", "1") as server:
            unbatched, _ = sweep(drive, server.address, levels, args.seconds)
        mlservers: list[Sweep] = []
        if not args.only_ours:
            for workers in (0, None):
                with servers.mlserver(tmp, env, args.mlserver, workers) as served:
                    mlservers.append(sweep(drive, served.address, levels, args.seconds)[0])
    theirs = best_of(mlservers, levels) if mlservers else {}

    runs = (ours, unbatched, *mlservers)
    failed = sum(d.failed for run in runs for d in run.values())
    print(
        f"# load generator: {args.load}, {args.seconds:g}s per level; req/s | p50 ms | p99 ms; "
        f"{failed} requests failed at the HTTP/2 level"
    )
    header = "| concurrency | ours (defaults) | | | mean batch | ours, batching off | | |"
    rule = "|---|---|---|---|---|---|---|---|"
    if theirs:
        header += " MLServer parallel_workers=0 | | | MLServer defaults | | |"
        rule += "---|---|---|---|---|---|"
    print(header)
    print(rule)
    for level in levels:
        row = f"| {level} | {cell(ours[level])} | {batch[level]:.1f} | {cell(unbatched[level])} |"
        for theirs_seen in mlservers:
            row += f" {cell(theirs_seen[level])} |"
        print(row)
    for level in levels if theirs else ():
        print(
            f"serve_curve concurrency={level} "
            f"ratio_vs_mlserver_best={ours[level].rps / theirs[level].rps:.2f} "
            f"p99_ratio={ours[level].p99 / theirs[level].p99:.2f}"
        )
    draw(
        args.picture,
        levels,
        ours,
        theirs,
        f"MLP 64-256-10, batch-1 FP32 raw ModelInfer, {args.load}, {args.seconds:g}s a level",
    )
    print(f"# drew {args.picture}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
