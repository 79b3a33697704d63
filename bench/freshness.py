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
replica's link is cut (hostlab `cut`) once it has received the fraction `--cut-at` (0.5) of a
push (its GetModel's `pending` says how much; the cut lands within one poll of it), and

    freshness-cut link=1gbit fanout=F replicas=M cut=replica2 cut_at=0.5 ... others_seconds=T
        normal_seconds=N ratio_vs_normal=T/N cut_serves_newest_within_one_sync=yes|no

    T: until `sync()` returns, every replica but the cut one committed (it lags)
    then the link is restored and one more sync runs: `yes` when the cut one serves that
    sync's version by the time the sync returned plus one normal freshness N

`--repeat` times (one more sync after each, so that the cut one rejoins the chain): T is the
median, each run's T and how many runs caught the cut one up in time follow the line.

The 10 Gbit/s figures are CPU-bound on a two-core machine (the trainer, the replicas and the
client share it) and say so; so are chains of many replicas at 1 Gbit/s there, where every
replica receives, hashes and swaps at the link rate at once. The picture of freshness against
replicas, chain against direct, goes to `--picture` (matplotlib: `pip install -e '.[bench]'`;
without it the figures still print). `--logs DIR` keeps the services' logs, at INFO level.

Defaults, sized to finish within about ten minutes on a 2-core machine: a 128 MiB model,
1, 2, 4 and 8 replicas at 1 Gbit/s, 1 and 8 at 10 Gbit/s, the cut scenario at 4, three timed
pushes per figure.

    python -m bench.freshness [--mib 128] [--replicas 1,2,4,8] [--fast-replicas 1,8]
                              [--cut-replicas 4] [--cut-at 0.5] [--repeat 3]
                              [--picture docs/freshness.png]

Needs root (the host lab); prints why and exits 2 where the lab cannot run.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.apps import Stamp
from bench.freshness_report import FANOUTS, FAST, SLOW, picture, report
from bench.freshness_trainer import drive
from bench.hostlab import HostLab
from bench.labrun import ROOT, replica_names, run_trainer, start_replicas
from bench.netns import LabUnavailableError
from devtools import launch

APP = "bench.apps:soak"


def parse_counts(text: str) -> list[int]:
    counts = sorted({int(part) for part in text.split(",") if part.strip()})
    if counts and counts[0] < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: replica counts such as 1,2,4,8")
    return counts


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
    returncode, results = run_trainer(lab, "bench.freshness", "--drive", spec, env)
    if returncode != 0:
        raise RuntimeError(f"the trainer side exited with {returncode}")
    return results


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
    parser.add_argument(
        "--cut-at",
        type=float,
        default=0.5,
        help="the fraction of a push the cut replica has received when its link is cut",
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
            "at": args.cut_at,
        }
    with (
        tempfile.TemporaryDirectory() as tmp,
        lab,
        launch.Launcher(args.logs or Path(tmp), env, grace=30) as launcher,
    ):
        print(f"# load average at the start: {load()}", flush=True)
        started = time.perf_counter()
        level = "INFO" if args.logs else "WARNING"
        start_replicas(lab, launcher, APP, names, level)
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
