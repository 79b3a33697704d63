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
computed on the new weights whole. Both fan-outs are measured in the same run, on the same
replicas: `chain` (the default: the trainer sends one push, each replica passes it on to the
next as it arrives) and `direct` (one push per replica, each over the trainer's own link).
Figures are medians over `--repeat` pushes after one warm-up push (connections, first full
push, which is direct) per fan-out and replica count:

    freshness link=1gbit fanout=F replicas=M model_mib=S seconds=T link_bound_ratio=X ratio_vs_one=Y

    X: the time the model's bytes take at the link rate, over T (1.0: as fast as the wire)
    Y: T over T at one replica, same link rate and fan-out

Then, per fan-out at `--cut-replicas` replicas (1 Gbit/s), the cut scenario: the second
replica's link is cut (hostlab `cut`) once it has received part of a push, and

    freshness-cut link=1gbit fanout=F replicas=M cut=replica2 ... others_seconds=T
        normal_seconds=N ratio_vs_normal=T/N cut_serves_newest_within_one_sync=yes|no

    T: until `sync()` returns, every replica but the cut one committed (it lags)
    then the link is restored and one more sync runs: `yes` when the cut one serves that
    sync's version by the time the sync returned plus one normal freshness N

The 10 Gbit/s figures are CPU-bound on a two-core machine (the trainer, the replicas and the
client share it) and say so; so are chains of many replicas at 1 Gbit/s there, where every
replica receives, hashes and swaps at the link rate at once. The picture of freshness against
replicas, chain against direct, goes to `--picture` (matplotlib: `pip install -e '.[bench]'`;
without it the figures still print). `--logs DIR` keeps the services' logs, at INFO level.

Defaults, sized to finish within about ten minutes on a 2-core machine: a 128 MiB model,
1, 2, 4 and 8 replicas at 1 Gbit/s, 1 and 8 at 10 Gbit/s, the cut scenario at 4, three timed
pushes per figure.

    python -m bench.freshness [--mib 128] [--replicas 1,2,4,8] [--fast-replicas 1,8]
                              [--cut-replicas 4] [--repeat 3] [--picture docs/freshness.png]

Needs root (the host lab); prints why and exits 2 where the lab cannot run.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
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

import grpc
import torch

from bench.apps import Stamp
from bench.hostlab import HostLab, rate_bits
from bench.netns import LabUnavailableError
from devtools import launch
from inference_service.client import InferenceClient
from shared.allocator import tune_for_streaming
from shared.gen.weightsync.v1 import weightsync_pb2 as pb
from shared.gen.weightsync.v1 import weightsync_pb2_grpc as pb_grpc
from shared.settings import ProcessSettings
from trainer_service.publisher import Publisher

ROOT = Path(__file__).resolve().parent.parent
MODEL = "stamp"
APP = "bench.apps:soak"
DATA_PORT = 8001
SYNC_PORT = 9001
POLL_S = 0.005  # between ModelMetadata calls to one replica, times the number of replicas
SLOW, FAST = "1gbit", "10gbit"
FANOUTS = ("chain", "direct")


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


def publish_timed(publisher: Publisher, state: dict[str, torch.Tensor]) -> tuple[Any, float]:
    """One sync: its report and its seconds."""
    started = time.perf_counter()
    report = publisher.publish(MODEL, state)
    return report, time.perf_counter() - started


def link(command: str, cut: dict[str, str]) -> None:
    """The cut replica's switch port `down` or `up` (bench/hostlab.py `cut`, `restore`)."""
    argv = ["ip", "-n", cut["switch"], "link", "set", cut["port"], command]
    subprocess.run(argv, check=True, capture_output=True)


def cut_mid_push(cut: dict[str, Any], version: int, normal_s: float) -> None:
    """Cut the replica's link once it has received part of `version` (its sync plane's
    GetModel says so), or after a normal push's time at the latest."""
    channel = grpc.insecure_channel(f"{cut['name']}:{SYNC_PORT}")
    stub = pb_grpc.WeightSyncStub(channel)
    deadline = time.perf_counter() + normal_s
    try:
        while time.perf_counter() < deadline:
            state = stub.GetModel(pb.GetModelRequest(model_name=MODEL), timeout=5)
            if state.pending.version == version and state.pending.bytes_received > 0:
                break
            time.sleep(POLL_S)
    finally:
        channel.close()
        link("down", cut)


def serves(client: InferenceClient, version: int, within_s: float) -> float | None:
    """When `client`'s replica was seen serving `version` or newer (perf_counter; None: not
    within `within_s` seconds)."""
    started = time.perf_counter()
    while time.perf_counter() - started < within_s:
        try:
            if int(client.metadata(MODEL).versions[0]) >= version:
                return time.perf_counter()
        except Exception:  # not answering yet: its link just came back
            pass
        time.sleep(POLL_S)
    return None


def cut_scenario(
    publisher: Publisher,
    clients: Sequence[InferenceClient],
    state: dict[str, torch.Tensor],
    value: float,
    normal_s: float,
    cut: dict[str, Any],
) -> dict[str, Any]:
    """One replica's link cut mid-push: how long the others take to commit and serve it, then
    the link restored and one more sync: whether the cut one serves the newest version by the
    time that sync is done (plus one normal freshness for its data plane to show it)."""
    index = int(cut["index"])
    others = [c for i, c in enumerate(clients) if i != index]
    fill(state, value)
    expected = publisher.version(MODEL) + 1
    cutter = threading.Thread(target=cut_mid_push, args=(cut, expected, normal_s))
    cutter.start()
    try:
        report, others_s = publish_timed(publisher, state)
    finally:
        cutter.join()
    cross_check(others, report.version, value)
    lagging = list(report.lagging)
    link("up", cut)
    restored = time.perf_counter()
    fill(state, value + 1)
    after, after_s = publish_timed(publisher, state)
    synced = time.perf_counter()
    seen = serves(clients[index], after.version, 60.0)
    if seen is not None:
        cross_check([clients[index]], after.version, value + 1)
    return {
        "kind": "cut",
        "replicas": len(clients),
        "cut": cut["name"],
        "others_s": others_s,
        "normal_s": normal_s,
        "lagging": lagging,
        "committed": report.targets,
        "next_sync_s": after_s,
        "caught_up": seen is not None and seen - synced <= normal_s,
        "after_restore_s": None if seen is None else seen - restored,
    }


def drive(spec: dict[str, Any]) -> int:
    """The trainer side: for each fan-out and replica count, a publisher to that many replicas,
    a warm-up push, then `repeat` timed pushes; one JSON line per figure, and one for the cut
    scenario where `spec` asks for it."""
    if spec.get("logs"):
        logging.basicConfig(
            filename=Path(spec["logs"]) / "trainer.log",
            level=logging.INFO,
            format="%(asctime)s %(name)s %(levelname)s %(message)s",
        )
    tune_for_streaming(ProcessSettings.from_environ(os.environ, "bench").malloc)
    state = {k: v.detach() for k, v in Stamp(spec["mib"]).state_dict().items()}
    value = float(spec["base"])
    cut = spec.get("cut")
    for fanout in spec["fanouts"]:
        for count in spec["replicas"]:
            names = replica_names(count)
            publisher = Publisher([f"{n}:{SYNC_PORT}" for n in names], "freshness", fanout=fanout)
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
                figures = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
                line = {"kind": "freshness", "fanout": fanout, "replicas": count, **figures}
                print(json.dumps(line), flush=True)
                if cut and count == cut["replicas"]:
                    value += 1
                    try:
                        result = cut_scenario(
                            publisher, clients, state, value, figures["seconds"], cut
                        )
                    except Exception as error:  # reported: the figure says what went wrong
                        result = {"kind": "cut", "replicas": count, "error": repr(error)}
                        link("up", cut)
                    value += 1
                    print(json.dumps({**result, "fanout": fanout}), flush=True)
            finally:
                publisher.close()
                for client in clients:
                    client.close()
    return 0


# -- the lab and the replicas ------------------------------------------------------------------


def parse_counts(text: str) -> list[int]:
    counts = sorted({int(part) for part in text.split(",") if part.strip()})
    if counts and counts[0] < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: replica counts such as 1,2,4,8")
    return counts


def start_replicas(
    lab: HostLab,
    launcher: launch.Launcher,
    names: Sequence[str],
    directory: Path,
    log_level: str = "WARNING",
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
            *("--log-level", log_level, "--metrics-listen", "off"),
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
    lab: HostLab,
    env: dict[str, str],
    rate: str,
    counts: Sequence[int],
    args: argparse.Namespace,
    cut: dict[str, Any] | None,
) -> list[dict[str, Any]]:
    """Shape every link to `rate` and run the trainer side inside the trainer host: both
    fan-outs, and the cut scenario where `cut` names it."""
    lab.set_rate(rate)
    base = 1000 if rate == FAST else 0  # stamp values no earlier step used
    spec = {
        "mib": args.mib,
        "replicas": list(counts),
        "fanouts": FANOUTS,
        "repeat": args.repeat,
        "base": base,
        "cut": cut,
        "logs": str(args.logs.resolve()) if args.logs else None,
    }
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
    wire_s = model_bytes * 8 / rate_bits(rate)
    for fanout in FANOUTS:
        rows = [r for r in results if r["kind"] == "freshness" and r["fanout"] == fanout]
        one = next((r["seconds"] for r in rows if r["replicas"] == 1), None)
        for r in rows:
            ratio = f"{r['seconds'] / one:.2f}" if one else "n/a"
            note = f"  # sync() {r['sync_s']:.3f}s, all serving {r['served_s']:.3f}s"
            if rate == FAST:
                note += "; CPU-bound on two cores"
            print(
                f"freshness link={rate} fanout={fanout} replicas={r['replicas']} "
                f"model_mib={mib} seconds={r['seconds']:.3f} "
                f"link_bound_ratio={wire_s / r['seconds']:.2f} ratio_vs_one={ratio}{note}",
                flush=True,
            )
    for r in results:
        if r["kind"] != "cut":
            continue
        head = f"freshness-cut link={rate} fanout={r['fanout']} replicas={r['replicas']}"
        if "error" in r:
            print(f"{head} failed: {r['error']}", flush=True)
            continue
        after = r["after_restore_s"]
        print(
            f"{head} cut={r['cut']} model_mib={mib} others_seconds={r['others_s']:.3f} "
            f"normal_seconds={r['normal_s']:.3f} "
            f"ratio_vs_normal={r['others_s'] / r['normal_s']:.2f} "
            f"cut_serves_newest_within_one_sync={'yes' if r['caught_up'] else 'no'}"
            f"  # committed on {r['committed']}, lagging {','.join(r['lagging']) or 'none'}; "
            f"next sync {r['next_sync_s']:.3f}s; cut one serving the newest "
            + (f"{after:.3f}s after restore" if after is not None else "not within 60s"),
            flush=True,
        )


STYLE = {
    ("chain", SLOW): "o-",
    ("direct", SLOW): "o--",
    ("chain", FAST): "s-",
    ("direct", FAST): "s--",
}


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
    for rate, results in figures.items():
        label_rate = "1 Gbit/s" if rate == SLOW else "10 Gbit/s (CPU-bound, 2 cores)"
        for fanout in FANOUTS:
            rows = [r for r in results if r["kind"] == "freshness" and r["fanout"] == fanout]
            if rows:
                ax.plot(
                    [r["replicas"] for r in rows],
                    [r["seconds"] for r in rows],
                    STYLE[(fanout, rate)],
                    label=f"{fanout} fan-out, {label_rate}",
                )
    slow = [r for r in figures.get(SLOW, []) if r["kind"] == "freshness"]
    if slow:
        top = max(r["replicas"] for r in slow)
        wire_s = model_bytes * 8 / rate_bits(SLOW)
        ax.plot(
            [1, top],
            [wire_s, top * wire_s],
            ":",
            color="grey",
            label="one copy per replica, 1 Gbit/s",
        )
        ax.axhline(wire_s, linestyle=":", color="green", label="one copy in all, 1 Gbit/s")
    ax.set_xlabel("replicas")
    ax.set_ylabel("seconds from sync() to all serving")
    ax.set_title(f"Freshness, {mib} MiB model changed whole, emulated hosts, 2 CPU cores")
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
    parser.add_argument(
        "--cut-replicas",
        type=int,
        default=4,
        help="replicas in the cut scenario at 1 Gbit/s, one of --replicas (0: none)",
    )
    parser.add_argument("--repeat", type=int, default=3, help="timed pushes per figure")
    parser.add_argument("--picture", type=Path, default=ROOT / "docs" / "freshness.png")
    parser.add_argument(
        "--logs", type=Path, help="keep the replicas' logs (at INFO level) in this folder"
    )
    parser.add_argument("--drive", help=argparse.SUPPRESS)  # the trainer side, in the lab
    args = parser.parse_args()
    if args.drive:
        return drive(json.loads(args.drive))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that the lab is torn down
    env = {**os.environ, "BENCH_MB": str(args.mib), "PYTHONPATH": str(ROOT)}
    model_bytes = sum(t.numel() * t.element_size() for t in Stamp(args.mib).state_dict().values())
    if not args.replicas + args.fast_replicas:
        parser.error("no replica counts to measure")
    if args.cut_replicas and (args.cut_replicas < 2 or args.cut_replicas not in args.replicas):
        parser.error("--cut-replicas: 0, or a count of 2 or more among --replicas")
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
    cut = None
    if args.cut_replicas:
        # The second replica: in a chain, a middle hop with replicas after it.
        victim = lab.host(replica_names(args.cut_replicas)[1])
        cut = {
            "replicas": args.cut_replicas,
            "index": 1,
            "name": victim.name,
            "switch": lab.switch,
            "port": victim.port,
        }
    with (
        tempfile.TemporaryDirectory() as tmp,
        lab,
        launch.Launcher(args.logs or Path(tmp), env, grace=30) as launcher,
    ):
        print(f"# load average at the start: {load()}", flush=True)
        started = time.perf_counter()
        level = "INFO" if args.logs else "WARNING"
        start_replicas(lab, launcher, names, launcher.directory, level)
        print(f"# replicas serving after {time.perf_counter() - started:.0f}s", flush=True)
        for rate, counts in ((SLOW, args.replicas), (FAST, args.fast_replicas)):
            if counts:
                figures[rate] = measure(lab, env, rate, counts, args, cut if rate == SLOW else None)
                report(rate, figures[rate], model_bytes, args.mib)
        print(f"# load average at the end: {load()}; {time.perf_counter() - started:.0f}s in all")
    picture(args.picture, figures, model_bytes, args.mib)
    return 0


if __name__ == "__main__":
    sys.exit(main())
