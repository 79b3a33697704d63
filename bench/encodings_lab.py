"""bench/encodings.py `--lab`, the side that drives the host lab: replicas started in their
hosts, the trainer side run in its own, and the `wire step=...` lines printed."""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from bench.hostlab import HostLab, rate_bits
from bench.labrun import ROOT, replica_names, run_trainer, start_replicas
from bench.netns import LabUnavailableError
from devtools import launch


def lab_run(args: argparse.Namespace) -> int:
    """The lab: replicas started in their hosts, the trainer side run in its own; the lines."""
    names = replica_names(args.replicas)
    env = {**os.environ, "BENCH_ENC_MB": str(args.mb), "PYTHONPATH": str(ROOT)}
    try:
        lab = HostLab(["trainer", *names], rate=args.rate)
        lab.start()
    except LabUnavailableError as error:
        print(f"encodings: the host lab cannot run here: {error}")
        return 2
    link = rate_bits(args.rate) / 8
    print(
        f"# lab: trainer + {len(names)} replica(s), chain fan-out, link={args.rate}, "
        f"{args.mb} MiB fp32 model, steps 10 to {args.steps} measured; load {os.getloadavg()}",
        flush=True,
    )
    with (
        tempfile.TemporaryDirectory() as tmp,
        lab,
        launch.Launcher(args.logs or Path(tmp), env, grace=30) as launcher,
    ):
        level = "INFO" if args.logs else "WARNING"
        start_replicas(lab, launcher, "bench.encodings:lab_app", names, level)
        spec = {
            "mb": args.mb,
            "steps": max(args.steps, 11),
            "replicas": names,
            "baseline": args.baseline,
            "encoding": args.push_encoding,
            "logs": str(args.logs.resolve()) if args.logs else None,
            "cases": args.cases,
        }
        returncode, results = run_trainer(lab, "bench.encodings", "--lab-drive", spec, env)
        if returncode != 0:
            print(f"encodings: the trainer side exited with {returncode}")
            return 1
    baseline = next(r["seconds"] for r in results if r["kind"] == "baseline")
    fp32_bytes = args.mb * (1 << 20)
    print(
        f"# whole fp32 pushes (warm-up): {baseline:.3f}s from sync() to all serving "
        f"({fp32_bytes / link:.3f}s of wire)",
        flush=True,
    )
    for r in (r for r in results if r["kind"] == "case"):
        print(
            f"wire step={r['case']} link={args.rate} bytes_ratio={r['wire'] / r['whole']:.4f} "
            f"freshness_ratio={r['seconds'] / r['whole_seconds']:.4f} "
            f"encode_gbps={r['encode_gbps']:.2f} encode_cpu_gbps={r['encode_cpu_gbps']:.2f}"
            f"  # measured: {r['seconds']:.3f}s per push, whole fp32 pushes of the same steps "
            f"{r['whole_seconds']:.3f}s, {args.replicas} replica(s); "
            f"{r['encoded_bytes'] / 1e6:.0f} MB through the encoders",
            flush=True,
        )
    print(f"# load at the end: {os.getloadavg()}", flush=True)
    return 0
