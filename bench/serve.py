"""Serving figures against MLServer at its best and a bare grpc.aio ceiling, as ratios measured
in the same run.

Serves one torch MLP (64 -> 256 -> 10) from this project's inference service and from MLServer
(its custom-runtime way of serving torch) twice, with its default worker pool and with
`parallel_workers: 0` (the model in its own process, its best on a small host), beside a bare
grpc.aio server that answers a canned response and does no work (bench/echo_server.py: the
ceiling of a Python gRPC server). All run at once; the same load generator drives each in turn,
in `--rounds` interleaved rounds so drift on a noisy host hits all alike: `--concurrency`
clients, each sending one prebuilt batch-1 FP32 raw ModelInfer request and waiting for its
answer, and one client alone (concurrency 1, the latency a real-time agent feels). The closed
loop is h2load (Debian's nghttp2-client) where installed, else Python threads (`--load
threads`), which take about a core of their own here. Then the swap cost on our service at an
operating point (bench/swap.py): open-loop loads at 50% and 80% of the capacity just measured
(Python asyncio, grpc.aio's client: bench/load.py `drive_rate`; the capacity here is what
that generator gets served in a closed loop, its own CPU counted) and at saturation, with a
trainer at normal priority pushing the 100 MB model every second, against no trainer. Prints

    serve_mlp cpu_per_request_vs_ceiling=C
        the server's CPU (its process tree's, at the full concurrency) a request, ours over the
        ceiling's: steadier than requests/s on a busy host
    serve_mlp ratio_vs_mlserver_best=X ratio_vs_ceiling=Y p99_ratio=Z
        X: our req/s over the better MLServer setting's; Y: over the ceiling's; Z: our p99 over
        that MLServer setting's
    serve_c1 p50_ratio=A p99_ratio=B
        concurrency 1: our p50 and p99 over the lower of the two MLServer settings' each
    swap load=50% p99_ratio=C    our p99 with pushes over without, open loop at 50% of capacity
    swap load=80% p99_ratio=D    the same at 80%
    swap load=saturation p99_ratio=E failed=N
    swap-forwarding load=50% p99_ratio=F not_forwarding=C difference=F-C   (with --forwarding)
        the same service passing every push on to a second replica (a chain), against not

MLServer runs from its own virtual environment (its dependencies differ from ours), created on
first use under .bench/mlserver-venv unless --mlserver points at an `mlserver` executable.
`--device cuda` serves ours from the GPU; `--only-ours` skips MLServer (and the ratios against
it), for hosts where its environment cannot be installed.

    python -m bench.serve [--seconds 20] [--concurrency 8] [--rounds 4] [--swap-seconds 20]
                          [--device cpu] [--only-ours] [--load h2load|threads]

Our service runs with its defaults, `--sync-relay auto` included (the sync relay where it may use
4 or more CPUs); INFERENCE_SYNC_RELAY=on or off in the environment chooses.

`failed` counts requests that failed at the HTTP/2 level and those our service answered with a
gRPC error (its own request counter); each server's answer is checked once with a real client.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import sys
import tempfile
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from bench import load, servers
from bench.load import Drive
from bench.swap import SATURATION, Tail, swap_cost, swap_pauses

OURS, CEILING = "ours", "ceiling"
MLSERVER = {"mlserver_pw0": 0, "mlserver_default": None}  # parallel_workers (None: default)
LABELS = {
    OURS: "ours",
    CEILING: "bare grpc.aio echo (ceiling)",
    "mlserver_pw0": "MLServer parallel_workers=0",
    "mlserver_default": "MLServer defaults",
}


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


def loadavg() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def figure(drive: Drive) -> str:
    return (
        f"{drive.rps:,.0f} req/s p50 {drive.p50 * 1e3:.2f} ms p99 {drive.p99 * 1e3:.2f} ms "
        f"({drive.failed} failed)"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description="serving figures against MLServer")
    parser.add_argument("--seconds", type=float, default=20.0, help="per server and load")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=4, help="interleaved rounds")
    parser.add_argument(
        "--swap-seconds", type=float, default=20.0, help="per load, with and without pushes"
    )
    parser.add_argument("--mlserver", help="path of an `mlserver` executable to use")
    parser.add_argument("--device", default="cpu", help="our service's device (cpu, cuda)")
    parser.add_argument("--only-ours", action="store_true", help="skip MLServer")
    parser.add_argument("--no-swap", action="store_true", help="skip the swap figures")
    parser.add_argument(
        "--forwarding",
        action="store_true",
        help="swap figures also with every push passed on to a second replica (chain)",
    )
    parser.add_argument(
        "--load",
        choices=load.GENERATORS,
        default=load.DEFAULT,
        help="load generator (default: h2load where installed, from Debian's nghttp2-client)",
    )
    parser.add_argument(
        "--generator-nice",
        type=int,
        default=load.default_nice(),
        help="CPU priority of the open loop's generator process (default: -10 as root, else 0)",
    )
    args = parser.parse_args()
    if args.swap_seconds <= 0:
        parser.error("--swap-seconds must be positive (--no-swap skips the swap figures)")
    drive = functools.partial(load.drive_with, args.load)
    piece = args.seconds / args.rounds
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        env = servers.mlp_env(tmp)
        server = stack.enter_context(servers.ours(tmp, env, "--device", args.device))
        others = stack.enter_context(contextlib.ExitStack())  # stopped before the swap figures
        served = {
            OURS: servers.Served(server.address, server.process.pid),
            CEILING: others.enter_context(servers.echo(tmp, env)),
        }
        if not args.only_ours:
            for name, workers in MLSERVER.items():
                served[name] = others.enter_context(
                    servers.mlserver(tmp, env, args.mlserver, workers)
                )
        full = {name: Drive() for name in served}
        alone = {name: Drive() for name in served}
        cpu = dict.fromkeys(served, 0.0)  # each server's CPU seconds at full concurrency
        for one in served.values():
            drive(one.address, 2, args.concurrency)  # warm
        print(f"# before the rounds: {loadavg()}")
        for _ in range(args.rounds):
            for name, one in served.items():
                began = one.cpu_seconds()
                full[name].add(drive(one.address, piece, args.concurrency))
                cpu[name] += one.cpu_seconds() - began
                alone[name].add(drive(one.address, piece, 1))
        print(f"# after the rounds: {loadavg()}")
        print(
            f"# load generator: {args.load}; ours on {args.device}; {args.rounds} interleaved "
            f"rounds, {args.seconds:g}s of each server at each concurrency in all"
        )
        per = {name: cpu[name] / max(len(full[name].latencies), 1) for name in served}
        for name in served:
            print(
                f"# {LABELS[name]}, concurrency {args.concurrency}: {figure(full[name])}, "
                f"{per[name] * 1e6:,.0f} us of the server's CPU a request"
            )
            print(f"# {LABELS[name]}, concurrency 1: {figure(alone[name])}")
        # CPU a request swings far less than requests/s with the host's load
        print(f"serve_mlp cpu_per_request_vs_ceiling={per[OURS] / per[CEILING]:.2f}")
        ours, ceiling = full[OURS], full[CEILING]
        if not args.only_ours:
            best = max(MLSERVER, key=lambda name: full[name].rps)
            theirs = full[best]
            print(f"# MLServer's best at concurrency {args.concurrency}: {LABELS[best]}")
            print(
                f"serve_mlp ratio_vs_mlserver_best={ours.rps / theirs.rps:.2f} "
                f"ratio_vs_ceiling={ours.rps / ceiling.rps:.2f} "
                f"p99_ratio={ours.p99 / theirs.p99:.2f}"
            )
            p50 = min(alone[name].p50 for name in MLSERVER)
            p99 = min(alone[name].p99 for name in MLSERVER)
            print(
                f"serve_c1 p50_ratio={alone[OURS].p50 / p50:.2f} "
                f"p99_ratio={alone[OURS].p99 / p99:.2f}"
            )
        else:
            print(f"serve_mlp ratio_vs_ceiling={ours.rps / ceiling.rps:.2f}")
        others.close()  # only ours runs for the swap figures
        if args.no_swap:
            return 0
        shares = (0.5, 0.8, SATURATION)
        print(f"# swap: before, {loadavg()}")
        # the capacity the open loop takes shares of: the most its own generator (Python
        # asyncio, about half a core here) gets served, not h2load's
        generator = load.Generator(args.generator_nice)
        stack.callback(generator.close)
        capacity = generator.closed(server.address, piece * 2, args.concurrency)
        forward_to = None
        if args.forwarding:  # on 127.0.0.2, so that the service under load heads the chain
            on = ("--sync-listen", "127.0.0.2:0", "--sync-relay", "off")
            tail = stack.enter_context(servers.ours(tmp, env, *on))
            forward_to = Tail(
                f"127.0.0.2:{tail.ports['sync_port']}", tail.process.pid, tail.metrics_url
            )
        print(
            f"# swap: capacity with the open loop's generator (grpc.aio client, closed loop, "
            f"concurrency {args.concurrency}, its own process at nice {generator.nice}): "
            f"{figure(capacity)}"
        )
        swaps = swap_cost(
            drive,
            generator.rate,
            server.address,
            f"127.0.0.1:{server.ports['sync_port']}",
            env,
            server.metrics_url,
            capacity=capacity.rps,
            shares=shares,
            concurrency=args.concurrency,
            seconds=args.swap_seconds,
            rounds=max(1, args.rounds // 2),
            forward_to=forward_to,
        )
        print(f"# swap: after, {loadavg()}")
        failed = failed_on_server(server.metrics_url) + sum(
            got.failed for seen in swaps.values() for got in (seen.quiet, seen.syncing)
        )
        relay = server.ports.get("sync_relay_pid")
        print(
            f"# swap: trainer at normal priority pushing the 100 MB model each second to "
            f"{'the sync relay' if relay else 'the service'}; capacity {capacity.rps:,.0f} req/s; "
            f"{swap_pauses(server.metrics_url)}"
        )
        for share, seen in swaps.items():
            name = "saturation" if share == SATURATION else f"{share:.0%}"
            drives = [("without pushes", seen.quiet), ("with pushes", seen.syncing)]
            if forward_to is not None:
                drives.append(("with pushes passed on", seen.forwarding))
            for what, got in drives:
                asked = (
                    f", asked {got.asked_rps:,.0f} req/s, most late {got.late * 1e3:.1f} ms"
                    if got.asked
                    else ""
                )
                print(f"# swap load={name} {what}: {figure(got)}{asked}")
            print(f"# swap load={name}: {seen.commits} commits in {seen.seconds:.0f}s with pushes")
            if forward_to is not None:
                print(
                    f"# swap load={name}: {seen.passed_on} versions passed on to the second "
                    f"replica in {seen.forwarding_seconds:.0f}s"
                )
        for share, seen in swaps.items():
            name = "saturation" if share == SATURATION else f"{share:.0%}"
            extra = f" failed={failed}" if share == SATURATION else ""
            print(f"swap load={name} p99_ratio={seen.p99_ratio:.2f}{extra}")
            if forward_to is not None:
                print(
                    f"swap-forwarding load={name} p99_ratio={seen.forwarding_p99_ratio:.2f} "
                    f"not_forwarding={seen.p99_ratio:.2f} "
                    f"difference={seen.forwarding_p99_ratio - seen.p99_ratio:+.2f}"
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
