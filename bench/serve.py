"""Serving figures against MLServer, as ratios measured in the same run.

Serves one torch MLP (64 -> 256 -> 10) from this project's inference service and from MLServer
(its custom-runtime way of serving torch), one after the other on this machine, and drives each
with the same load generator: `--concurrency` clients, each sending one prebuilt batch-1 FP32
raw ModelInfer request over gRPC and waiting for its answer, for `--seconds`. The generator is
h2load (Debian's nghttp2-client) where it is installed, else Python threads with grpcio's
client (`--load threads`), which takes about a core of its own here. Prints

    serve_mlp ratio_vs_mlserver=X p99_ratio=Y    throughput ours/theirs; p99 ours/theirs
    swap_p99_ratio=Z failed=N                    our p99 while a 100 MB model's sync commits
      cpu_yardstick_p99_ratio=W                  every second, over our p99 without syncs
                                                 (the trainer in its own process, at nice 19);
                                                 W: our p99 beside a process at the lowest
                                                 priority that only spends as much CPU a second
                                                 as the syncs did (bench/cpu_yardstick.py),
                                                 over p99 without: what that CPU time alone
                                                 costs on this host (5 s slices of the three
                                                 conditions, alternating)

MLServer runs from its own virtual environment (its dependencies differ from ours), created on
first use under .bench/mlserver-venv unless --mlserver points at an `mlserver` executable.
`--device cuda` serves ours from the GPU; `--only-ours` skips MLServer (and the ratios against
it), for hosts where its environment cannot be installed.

    python -m bench.serve [--seconds 20] [--concurrency 8] [--device cpu] [--only-ours]
                          [--load h2load|threads]

Our service runs with its defaults, `--sync-relay auto` included (the sync relay where it may use
4 or more CPUs); INFERENCE_SYNC_RELAY=on or off in the environment chooses.

`failed` counts requests that failed at the HTTP/2 level and those our service answered with a
gRPC error (its own request counter); each server's answer is checked once with a real client.
"""

from __future__ import annotations

import argparse
import functools
import sys
import tempfile
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from bench import load, servers
from bench.swap import SEGMENT_S, swap_pauses, swapping


def failed_on_server(metrics_url: str) -> int:
    """Requests our service answered with an error (cancellations excepted: h2load cancels the
    requests in flight when its time is up)."""
    with urllib.request.urlopen(metrics_url, timeout=10) as response:
        text = response.read().decode()
    return round(
        sum(
            sample.value
            for family in text_string_to_metric_families(text)
            if family.name == "weightsync_inference_requests"
            for sample in family.samples
            if sample.name.endswith("_total")
            and sample.labels.get("code") not in ("OK", "CANCELLED")
        )
    )


def main() -> int:
    parser = argparse.ArgumentParser(description="serving figures against MLServer")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--mlserver", help="path of an `mlserver` executable to use")
    parser.add_argument("--device", default="cpu", help="our service's device (cpu, cuda)")
    parser.add_argument("--only-ours", action="store_true", help="skip MLServer")
    parser.add_argument(
        "--load",
        choices=load.GENERATORS,
        default=load.DEFAULT,
        help="load generator (default: h2load where installed, from Debian's nghttp2-client)",
    )
    args = parser.parse_args()
    drive = functools.partial(load.drive_with, args.load)
    with tempfile.TemporaryDirectory() as tmp:
        env = servers.mlp_env(tmp)
        with servers.ours(tmp, env, "--device", args.device) as server:
            data = server.address
            drive(data, 2, args.concurrency)  # warm
            ours = drive(data, args.seconds, args.concurrency)
            relay = server.ports.get("sync_relay_pid")
            swap = swapping(
                drive,
                data,
                f"127.0.0.1:{server.ports['sync_port']}",
                args.seconds,
                args.concurrency,
                env,
                [server.process.pid, *([relay] if relay else [])],
                server.metrics_url,
            )
            swaps = swap_pauses(server.metrics_url)
            failed = swap.quiet.failed + swap.syncing.failed + failed_on_server(server.metrics_url)
        print(
            f"# load generator: {args.load}; ours on {args.device}, "
            f"concurrency {args.concurrency}, {args.seconds:g}s: "
            f"{ours.rps:,.0f} req/s p99 {ours.p99 * 1e3:.2f} ms ({ours.failed} failed)"
        )
        quiet, syncing = swap.quiet, swap.syncing
        print(
            f"# {SEGMENT_S:g}s slices without syncs, with them and beside the CPU yardstick, "
            f"alternating, {args.seconds:g}s of each: without {quiet.rps:,.0f} req/s p99 "
            f"{quiet.p99 * 1e3:.2f} ms; with {syncing.rps:,.0f} req/s p99 "
            f"{syncing.p99 * 1e3:.2f} ms, {swap.commits} commits of the 100 MB model (trainer "
            f"in its own process, on {'the sync relay' if relay else 'the service'}); {swaps}"
        )
        print(
            f"# CPU yardstick: the syncs took {swap.sync_cpu_ms_per_s:.0f} ms of CPU a second "
            f"(trainer, relay, service); a process at the lowest priority copying memory for "
            f"as long each second: {swap.yardstick.rps:,.0f} req/s p99 "
            f"{swap.yardstick.p99 * 1e3:.2f} ms"
        )
        print(
            f"swap_p99_ratio={syncing.p99 / quiet.p99:.2f} failed={failed} "
            f"cpu_yardstick_p99_ratio={swap.yardstick.p99 / quiet.p99:.2f}"
        )
        if args.only_ours:
            return 0

        with servers.mlserver(tmp, env, args.mlserver) as address:
            drive(address, 2, args.concurrency)
            theirs_seen = drive(address, args.seconds, args.concurrency)

    print(
        f"# MLServer, concurrency {args.concurrency}, {args.seconds:g}s: "
        f"{theirs_seen.rps:,.0f} req/s p99 {theirs_seen.p99 * 1e3:.2f} ms "
        f"({theirs_seen.failed} failed)"
    )
    print(
        f"serve_mlp ratio_vs_mlserver={ours.rps / theirs_seen.rps:.2f} "
        f"p99_ratio={ours.p99 / theirs_seen.p99:.2f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
