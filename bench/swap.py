"""bench/serve.py's swap figures: our service's p99 at an operating point (an open-loop load at
a fixed share of the capacity the same run measured, and at saturation), while a trainer process
at normal priority pushes the 100 MB model every second, over its p99 with no trainer at all.

Slices with pushes and slices without alternate, so drift on a noisy host hits both alike. A
slice with pushes runs while a trainer process pushes (`--run-interval 1`), from its second
commit on; a slice without has no trainer process, so no push in flight at all (the trainer is
never frozen mid-push). Each round starts and stops one trainer.

With a second replica (`forward_to`, its sync address), each round also runs a slice in which
the trainer pushes to both, so that the service under load passes every push on to that one as
it arrives (the chain, trainer_service/chain.py): its p99 ratio forwarding against not. The
second replica stands in for another machine: it runs at the lowest CPU priority, so what its
own receiving costs the two shared cores shows as little as it can."""

from __future__ import annotations

import contextlib
import functools
import os
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from bench.load import Drive
from devtools import launch

SATURATION = 0.0  # a load share meaning: the closed loop, every client one request in flight


@dataclass
class Swapping:
    """What the load generators saw at one load, without pushes and with them."""

    quiet: Drive = field(default_factory=Drive)
    syncing: Drive = field(default_factory=Drive)
    forwarding: Drive = field(default_factory=Drive)  # pushes passed on to a second replica
    commits: int = 0  # versions committed during the slices with pushes (not forwarding)
    seconds: float = 0.0  # the slices with pushes (not forwarding), in all
    passed_on: int = 0  # versions the second replica committed during the forwarding slices
    forwarding_seconds: float = 0.0

    @property
    def p99_ratio(self) -> float:
        return self.syncing.p99 / self.quiet.p99

    @property
    def forwarding_p99_ratio(self) -> float:
        return self.forwarding.p99 / self.quiet.p99


@dataclass(frozen=True)
class Tail:
    """The second replica a chain's pushes are passed on to: its sync address, process id and
    metrics."""

    sync: str
    pid: int
    metrics_url: str


def swap_cost(
    drive: Callable[[str, float, int], Drive],
    rate_drive: Callable[[str, float, float], Drive],
    data: str,
    sync: str,
    env: dict[str, str],
    metrics_url: str,
    *,
    capacity: float,
    shares: Sequence[float],
    concurrency: int,
    seconds: float,
    rounds: int,
    forward_to: Tail | None = None,
) -> dict[float, Swapping]:
    """Per load share of `capacity` (SATURATION: the closed loop of `concurrency` clients), our
    p99 with pushes and without, `seconds` of each in all, over `rounds` alternating rounds;
    with `forward_to` (a second replica), also with every push passed on to it."""
    seen = {share: Swapping() for share in shares}
    piece = seconds / rounds

    def run_all(kind: str) -> None:
        for share, swapping in seen.items():
            before = served_version(metrics_url, "blob")
            tail_before = served_version(forward_to.metrics_url, "blob") if forward_to else 0
            started = time.monotonic()
            if share == SATURATION:
                got = drive(data, piece, concurrency)
            else:
                got = rate_drive(data, piece, share * capacity)
            getattr(swapping, kind).add(got)
            if kind == "syncing":
                swapping.commits += served_version(metrics_url, "blob") - before
                swapping.seconds += time.monotonic() - started
            elif kind == "forwarding" and forward_to is not None:
                tail_after = served_version(forward_to.metrics_url, "blob")
                swapping.passed_on += tail_after - tail_before
                swapping.forwarding_seconds += time.monotonic() - started

    def pushing(targets: list[str], kind: str) -> None:
        trainer = launch.spawn(
            # warnings only: commits are counted from the service's metrics
            launch.trainer_command(
                "bench.serve_app:app", targets, "--run-interval", "1", *launch.QUIET
            ),
            env,
        )
        try:
            first = served_version(metrics_url, "blob")
            # from its second commit on: the trainer's start and first full copy are past (and
            # with two targets, the chain formed: its first push to each goes alone)
            launch.wait_for(
                trainer,
                functools.partial(committed_twice, metrics_url, first),
                what="the trainer (to commit the 100 MB model twice)",
                timeout=180,
                interval=0.1,
            )
            if forward_to is not None:
                lowest_priority(forward_to.pid)  # threads it started since
            run_all(kind)
        finally:
            launch.stop(trainer, 60)

    if forward_to is not None:
        lowest_priority(forward_to.pid)
    for round_ in range(rounds):
        if round_ % 2:
            run_all("quiet")
        pushing([sync], "syncing")
        if forward_to is not None:
            # the service under load sorts first, so it heads the chain
            assert sync < forward_to.sync
            pushing([sync, forward_to.sync], "forwarding")
        if not round_ % 2:
            run_all("quiet")
    return seen


def lowest_priority(pid: int) -> None:
    """Every thread of process `pid` at nice 19 (a nice value is per thread on Linux)."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(ProcessLookupError):
            os.setpriority(os.PRIO_PROCESS, int(task.name), 19)


def committed_twice(metrics_url: str, first: int) -> bool:
    return served_version(metrics_url, "blob") >= first + 2


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
