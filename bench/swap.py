"""bench/serve.py's swap figure: our service under load without syncs, with a trainer process
syncing a 100 MB model every second, and beside the CPU yardstick (bench/cpu_yardstick.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from bench.load import Drive
from devtools import launch

SEGMENT_S = 5.0  # the three conditions' slices alternate this often


@dataclass
class Swapping:
    """What the load generator saw without syncs, with them, and beside the CPU yardstick."""

    quiet: Drive
    syncing: Drive
    yardstick: Drive
    commits: int  # while syncing (the trainer also runs before the slices)
    sync_cpu_ms_per_s: float  # trainer, relay and service, measured with no load


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def swapping(
    drive: Callable[[str, float, int], Drive],
    data: str,
    sync: str,
    seconds: float,
    concurrency: int,
    env: dict[str, str],
    service_pids: list[int],
    metrics_url: str,
) -> Swapping:
    """Drive the MLP without syncs, with a trainer process syncing the 100 MB model each
    second, and beside the CPU yardstick (bench/cpu_yardstick.py) spending as much CPU per
    second as the syncs did (trainer, relay and service, measured first with no load).

    The three conditions alternate in `SEGMENT_S` slices (the trainer and the yardstick are
    stopped with SIGSTOP while not wanted), so drift on a noisy machine hits all alike; each
    condition gets `seconds` in all."""
    trainer = launch.spawn(
        # warnings only: commits are counted from the service's metrics
        launch.trainer_command("bench.serve_app:app", [sync], "--run-interval", "1", *launch.QUIET),
        env,
        # In a deployment the trainer has a host of its own; here it shares these cores with
        # the server and the load generator, so it runs at the lowest CPU priority to stand in
        # for that. The inference service's own cost of receiving the syncs is fully counted.
        nice=19,
    )
    yardstick: subprocess.Popen[bytes] | None = None
    quiet, syncing, beside = Drive(), Drive(), Drive()
    commits = 0
    try:
        # measure from the second commit on: the trainer's start and first full copy are past
        launch.wait_for(
            trainer,
            lambda: served_version(metrics_url, "blob") >= 2,
            what="the trainer (to commit the 100 MB model twice)",
            timeout=120,
            interval=0.1,
        )
        pids = [trainer.pid, *service_pids]
        before = sum(cpu_seconds(pid) for pid in pids)
        time.sleep(SEGMENT_S)
        cpu_ms = (sum(cpu_seconds(pid) for pid in pids) - before) / SEGMENT_S * 1e3
        yardstick = launch.spawn(
            [sys.executable, "-m", "bench.cpu_yardstick", f"--ms-per-s={cpu_ms:.1f}"], env
        )
        slices = max(1, round(seconds / SEGMENT_S))
        for _ in range(slices):
            trainer.send_signal(signal.SIGSTOP)
            yardstick.send_signal(signal.SIGSTOP)
            quiet.add(drive(data, seconds / slices, concurrency))
            version = served_version(metrics_url, "blob")
            trainer.send_signal(signal.SIGCONT)
            syncing.add(drive(data, seconds / slices, concurrency))
            trainer.send_signal(signal.SIGSTOP)
            commits += served_version(metrics_url, "blob") - version
            yardstick.send_signal(signal.SIGCONT)
            beside.add(drive(data, seconds / slices, concurrency))
    finally:
        if yardstick is not None:
            yardstick.kill()
            yardstick.wait()
        trainer.send_signal(signal.SIGCONT)
        launch.stop(trainer, 60)
    return Swapping(quiet, syncing, beside, commits, cpu_ms)


def served_version(metrics_url: str, model: str) -> int:
    with urllib.request.urlopen(metrics_url, timeout=10) as response:
        text = response.read().decode()
    for family in text_string_to_metric_families(text):
        if family.name == "weightsync_inference_model_version":
            for sample in family.samples:
                if sample.labels.get("model") == model:
                    return round(sample.value)
    return 0


def swap_pauses(metrics_url: str) -> str:
    """What the swaps cost the request path: how long each commit held the requests' lock."""
    with urllib.request.urlopen(metrics_url, timeout=10) as response:
        text = response.read().decode()
    samples = {
        (sample.name, sample.labels.get("le")): sample.value
        for family in text_string_to_metric_families(text)
        if family.name == "weightsync_inference_swap_duration_seconds"
        for sample in family.samples
        if sample.labels.get("model") == "blob"
    }
    prefix = "weightsync_inference_swap_duration_seconds"
    count = samples.get((f"{prefix}_count", None), 0.0)
    if not count:
        return "no swaps counted"
    total = samples[(f"{prefix}_sum", None)]
    under = samples.get((f"{prefix}_bucket", "0.001"), 0.0)
    return (
        f"the swap held the requests' lock {total / count * 1e6:.1f} us on average over "
        f"{count:.0f} swaps, {under:.0f} of them under 1 ms"
    )
