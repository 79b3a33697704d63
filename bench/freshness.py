"""Freshness across emulated hosts: from `sync()` called on the trainer to every replica serving
the new version.

A host lab (bench/hostlab.py: network namespaces on a bridge, every link shaped with tbf in both
directions) holds a trainer host and up to 8 replica hosts. Each replica host runs an inference
service serving `bench.apps:soak` (the stamp model: eight fp32 tensors, `--mib` MiB in all,
which every step changes whole), both planes on its lab address. This script re-runs itself
inside the trainer host, where the trainer service's Publisher pushes to the replicas by host
name (`replicaN:9001`) and a client polls every replica's data plane (`replicaN:8001`,
ModelMetadata, whose versions name the served one). Per push it times

    sync_s     until `publish()` (the trainer's `sync()`) returns: every replica committed
    served_s   until the client has seen every replica serve the new version
    seconds    the later of the two: fresh weights everywhere, and the trainer knows it

and then checks with ModelInfer on every replica that the answer names the new version and is
computed on the new weights whole. Figures are medians over `--repeat` pushes after one
warm-up push (connections, first full push) per replica count:

    freshness link=1gbit replicas=M model_mib=S seconds=T link_bound_ratio=X ratio_vs_one=Y

    X: the time the model's bytes take at the link rate, over T (1.0: as fast as the wire)
    Y: T over T at one replica, same link rate

Today the trainer sends one whole copy to every replica over its own link (direct fan-out), so
T grows with M. The 10 Gbit/s figures are CPU-bound on a two-core machine (the trainer, the
replicas and the client share it) and say so. The picture of freshness against replicas goes
to `--picture` (matplotlib: `pip install -e '.[bench]'`; without it the figures still print).

    python -m bench.freshness [--mib 128] [--replicas 1,2,4,8] [--fast-replicas 1,8]
                              [--repeat 3] [--picture docs/freshness.png]

Needs root (the host lab); prints why and exits 2 where the lab cannot run.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from bench.apps import Stamp
from bench.hostlab import HostLab, LabUnavailableError, rate_bits
from devtools import launch
from inference_service.client import InferenceClient
from shared.allocator import tune_for_streaming
from shared.settings import ProcessSettings
from trainer_service.publisher import Publisher

ROOT = Path(__file__).resolve().parent.parent
MODEL = "stamp"
APP = "bench.apps:soak"
DATA_PORT = 8001
SYNC_PORT = 9001
POLL_S = 0.005  # between ModelMetadata calls to one replica, times the number of replicas
SLOW, FAST = "1gbit", "10gbit"


def replica_names(count: int) -> list[str]:
    return [f"replica{i}" for i in range(1, count + 1)]


# -- inside the trainer host -------------------------------------------------------------------


def fill(state: dict[str, torch.Tensor], value: float) -> None:
    """One training step of the stamp model: every tensor, whole, takes `value`."""
    with torch.no_grad():
        for tensor in state.values():
            tensor.fill_(value)


def push_and_watch(
    publisher: Publisher, clients: Sequence[InferenceClient], state: dict[str, torch.Tensor]
) -> dict[str, float]:
    """One sync, timed from the trainer and from a client polling every replica."""
    expected = publisher.version(MODEL) + 1
    seen: list[float | None] = [None] * len(clients)
    done = threading.Event()
    interval = POLL_S * len(clients)  # 200 calls a second in all: light on two cores

    def watch(index: int) -> None:
        while not done.is_set():
            if int(clients[index].metadata(MODEL).versions[0]) >= expected:
                seen[index] = time.perf_counter()
                return
            done.wait(interval)

    watchers = [threading.Thread(target=watch, args=(i,)) for i in range(len(clients))]
    for watcher in watchers:
        watcher.start()
    started = time.perf_counter()
    try:
        report = publisher.publish(MODEL, state)
        synced = time.perf_counter()
        for watcher in watchers:
            watcher.join(timeout=120)
    finally:
        done.set()
    if report.version != expected or report.targets != len(clients) or report.lagging:
        raise RuntimeError(f"push of version {expected} did not reach every replica: {report}")
    if any(at is None for at in seen):
        raise RuntimeError(f"version {expected}: a replica was never seen serving it: {seen}")
    served = max(at for at in seen if at is not None)
    return {
        "version": report.version,
        "sync_s": synced - started,
        "served_s": served - started,
        "seconds": max(synced, served) - started,
    }


def cross_check(clients: Sequence[InferenceClient], version: int, value: float) -> None:
    """Every replica answers with `version`, computed on weights that are all `value`."""
    for client in clients:
        result = client.infer(MODEL, {"x": torch.zeros(1, 8)})
        means = torch.as_tensor(result.outputs["means"]).reshape(-1)
        if result.version != version or not torch.allclose(means, torch.full_like(means, value)):
            raise RuntimeError(
                f"{client}: answered version {result.version} with means {means.tolist()}, "
                f"expected version {version} at {value}"
            )


def drive(spec: dict[str, Any]) -> int:
    """The trainer side: for each replica count, a publisher to that many replicas, a warm-up
    push, then `repeat` timed pushes; one JSON line per replica count."""
    tune_for_streaming(ProcessSettings.from_environ(os.environ, "bench").malloc)
    state = {k: v.detach() for k, v in Stamp(spec["mib"]).state_dict().items()}
    value = float(spec["base"])
    for count in spec["replicas"]:
        names = replica_names(count)
        publisher = Publisher([f"{n}:{SYNC_PORT}" for n in names], "freshness")
        clients = [InferenceClient(f"{n}:{DATA_PORT}", timeout_s=60) for n in names]
        try:
            value += 1
            fill(state, value)
            publisher.publish(MODEL, state)  # warm-up: connections, first (full) push
            runs = []
            for _ in range(spec["repeat"]):
                value += 1
                fill(state, value)
                run = push_and_watch(publisher, clients, state)
                cross_check(clients, int(run["version"]), value)
                runs.append(run)
        finally:
            publisher.close()
            for client in clients:
                client.close()
        figures = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
        print(json.dumps({"replicas": count, **figures}), flush=True)
    return 0


# -- the lab and the replicas ------------------------------------------------------------------


def parse_counts(text: str) -> list[int]:
    counts = sorted({int(part) for part in text.split(",") if part.strip()})
    if counts and counts[0] < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: replica counts such as 1,2,4,8")
    return counts


def start_replicas(
    lab: HostLab, launcher: launch.Launcher, names: Sequence[str], directory: Path
) -> None:
    """An inference service on every replica host, both planes on its lab address; returns
    once all of them serve."""
    started = []
    for name in names:
        address = lab.address(name)
        ready = directory / f"{name}.ready.json"
        command = launch.inference_command(
            APP,
            ready,
            *launch.QUIET,
            *("--listen", f"{address}:{DATA_PORT}", "--sync-listen", f"{address}:{SYNC_PORT}"),
            # Nothing but the polling client is served, so the sync plane's lower CPU
            # priority has nothing to protect; left on, the receivers would only yield to the
            # trainer sharing these two cores, which a trainer on its own host is not.
            *("--sync-nice", "0"),
            # The lab's network is its own (nothing outside its namespaces reaches it): plain
            # pushes with no token, as bench/sync.py does on loopback.
            "--allow-open-sync",
        )
        started.append((name, ready, launcher.spawn(lab.command(name, command), name)))
    for name, ready, process in started:
        launch.wait_for(
            process,
            functools.partial(launch.read_json, ready),
            what=f"inference service on {name}",
            timeout=600,
            log=launcher.log_path(name),
        )


def measure(
    lab: HostLab, env: dict[str, str], rate: str, counts: Sequence[int], args: argparse.Namespace
) -> list[dict[str, Any]]:
    """Shape every link to `rate` and run the trainer side inside the trainer host."""
    lab.set_rate(rate)
    base = 1000 if rate == FAST else 0  # stamp values no earlier step used
    spec = {"mib": args.mib, "replicas": list(counts), "repeat": args.repeat, "base": base}
    trainer = lab.run(
        "trainer",
        [sys.executable, "-m", "bench.freshness", "--drive", json.dumps(spec)],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    out, _ = trainer.communicate()
    if trainer.returncode != 0:
        raise RuntimeError(f"the trainer side exited with {trainer.returncode}")
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def report(rate: str, results: list[dict[str, Any]], model_bytes: int, mib: int) -> None:
    one = next((r["seconds"] for r in results if r["replicas"] == 1), None)
    wire_s = model_bytes * 8 / rate_bits(rate)
    for r in results:
        ratio = f"{r['seconds'] / one:.2f}" if one else "n/a"
        note = f"  # sync() {r['sync_s']:.3f}s, all serving {r['served_s']:.3f}s"
        if rate == FAST:
            note += "; CPU-bound on two cores"
        print(
            f"freshness link={rate} replicas={r['replicas']} model_mib={mib} "
            f"seconds={r['seconds']:.3f} link_bound_ratio={wire_s / r['seconds']:.2f} "
            f"ratio_vs_one={ratio}{note}",
            flush=True,
        )


def picture(
    path: Path, figures: dict[str, list[dict[str, Any]]], model_bytes: int, mib: int
) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"# no picture: matplotlib is missing (pip install -e '.[bench]'); not {path}")
        return
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    slow = figures.get(SLOW, [])
    if slow:
        counts = [r["replicas"] for r in slow]
        top = max(counts)
        wire_s = model_bytes * 8 / rate_bits(SLOW)
        ax.plot(counts, [r["seconds"] for r in slow], "o-", label="direct fan-out, 1 Gbit/s")
        ax.plot(
            [1, top],
            [wire_s, top * wire_s],
            "--",
            color="grey",
            label="one copy per replica at 1 Gbit/s",
        )
        one = next((r["seconds"] for r in slow if r["replicas"] == 1), None)
        if one:
            ax.axhline(
                1.25 * one,
                linestyle=":",
                color="green",
                label="target at 1 Gbit/s with forwarding: 1.25 x one replica",
            )
    fast = figures.get(FAST, [])
    if fast:
        ax.plot(
            [r["replicas"] for r in fast],
            [r["seconds"] for r in fast],
            "s-",
            label="direct fan-out, 10 Gbit/s (CPU-bound, 2 cores)",
        )
    ax.set_xlabel("replicas")
    ax.set_ylabel("seconds from sync() to all serving")
    ax.set_title(f"Freshness, {mib} MiB model changed whole, emulated hosts")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    print(f"# picture: {path}")


def load() -> str:
    """The 1, 5 and 15 minute load averages: how busy the shared machine was."""
    return ", ".join(f"{x:.1f}" for x in os.getloadavg())


def main() -> int:
    parser = argparse.ArgumentParser(description="freshness across emulated hosts")
    parser.add_argument("--mib", type=int, default=128, help="model size in MiB")
    parser.add_argument(
        "--replicas", type=parse_counts, default=[1, 2, 4, 8], help="replica counts at 1 Gbit/s"
    )
    parser.add_argument(
        "--fast-replicas",
        type=parse_counts,
        default=[1, 8],
        help="replica counts at 10 Gbit/s (empty: none)",
    )
    parser.add_argument("--repeat", type=int, default=3, help="timed pushes per figure")
    parser.add_argument("--picture", type=Path, default=ROOT / "docs" / "freshness.png")
    parser.add_argument("--drive", help=argparse.SUPPRESS)  # the trainer side, in the lab
    args = parser.parse_args()
    if args.drive:
        return drive(json.loads(args.drive))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that the lab is torn down
    env = {**os.environ, "BENCH_MB": str(args.mib), "PYTHONPATH": str(ROOT)}
    model_bytes = sum(t.numel() * t.element_size() for t in Stamp(args.mib).state_dict().values())
    if not args.replicas + args.fast_replicas:
        parser.error("no replica counts to measure")
    names = replica_names(max(args.replicas + args.fast_replicas))
    figures: dict[str, list[dict[str, Any]]] = {}
    print(
        f"# {os.cpu_count()} CPUs; trainer + {len(names)} replica hosts, {args.mib} MiB model",
        flush=True,
    )
    try:
        lab = HostLab(["trainer", *names], rate=SLOW)
        lab.start()
    except LabUnavailableError as error:
        print(f"freshness: the host lab cannot run here: {error}")
        return 2
    with (
        tempfile.TemporaryDirectory() as tmp,
        lab,
        launch.Launcher(Path(tmp), env, grace=30) as launcher,
    ):
        print(f"# load average at the start: {load()}", flush=True)
        started = time.perf_counter()
        start_replicas(lab, launcher, names, Path(tmp))
        print(f"# replicas serving after {time.perf_counter() - started:.0f}s", flush=True)
        for rate, counts in ((SLOW, args.replicas), (FAST, args.fast_replicas)):
            if counts:
                figures[rate] = measure(lab, env, rate, counts, args)
                report(rate, figures[rate], model_bytes, args.mib)
        print(f"# load average at the end: {load()}", flush=True)
    picture(args.picture, figures, model_bytes, args.mib)
    return 0


if __name__ == "__main__":
    sys.exit(main())
