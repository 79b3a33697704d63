"""What bench/freshness.py and bench/encodings.py `--lab` share on the host lab
(bench/hostlab.py): inference services started on the replica hosts, the trainer side run in the
trainer host, and one sync timed until every replica serves the new version."""

from __future__ import annotations

import functools
import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from bench.hostlab import HostLab
from devtools import launch

if TYPE_CHECKING:
    from inference_service.client import InferenceClient

ROOT = Path(__file__).resolve().parent.parent
DATA_PORT = 8001
SYNC_PORT = 9001
POLL_S = 0.005  # between ModelMetadata calls to one replica, times the number of replicas
# The same while a sync runs: the calls are the measurement's own load on the hosts' two cores
# (each a call the replica answers while it decodes the push), and what they see before the
# sync returns cannot move the figure, which is the later of the two.
SYNCING_POLL_S = 0.025

Report = TypeVar("Report")


def replica_names(count: int) -> list[str]:
    return [f"replica{i}" for i in range(1, count + 1)]


def start_replicas(
    lab: HostLab,
    launcher: launch.Launcher,
    app: str,
    names: Sequence[str],
    log_level: str = "WARNING",
) -> None:
    """An inference service serving `app` on every replica host, both planes on its lab
    address; returns once all of them serve."""
    started = []
    for name in names:
        address = lab.address(name)
        ready = launcher.directory / f"{name}.ready.json"
        command = launch.inference_command(
            app,
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


def run_trainer(
    lab: HostLab, module: str, flag: str, spec: dict[str, Any], env: dict[str, str]
) -> tuple[int, list[dict[str, Any]]]:
    """`python -m <module> <flag> <spec as JSON>` run in the trainer host: its exit status and
    the JSON lines it printed."""
    trainer = lab.run(
        "trainer",
        [sys.executable, "-m", module, flag, json.dumps(spec)],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    out, _ = trainer.communicate()
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return trainer.returncode, lines


def publish_watched(
    clients: Sequence[InferenceClient],
    model: str,
    versions: Sequence[int],
    publish: Callable[[], Report],
) -> tuple[Report, float, float, list[float | None]]:
    """One sync (`publish`) while a client polls every replica's ModelMetadata until it serves
    `versions[i]` or newer: the sync's report, when it started and returned (perf_counter), and
    when each replica was seen serving (None: not within two minutes of the sync). The client
    polls 40 times a second in all while the sync runs, and once it returns asks every replica
    at once, then 200 times a second in all."""
    seen: list[float | None] = [None] * len(clients)
    done = threading.Event()
    returned = threading.Event()

    def watch(index: int) -> None:
        while not done.is_set():
            if int(clients[index].metadata(model).versions[0]) >= versions[index]:
                seen[index] = time.perf_counter()
                return
            if returned.is_set():
                done.wait(POLL_S * len(clients))
            else:
                returned.wait(SYNCING_POLL_S * len(clients))

    watchers = [threading.Thread(target=watch, args=(i,)) for i in range(len(clients))]
    for watcher in watchers:
        watcher.start()
    started = time.perf_counter()
    try:
        report = publish()
        synced = time.perf_counter()
        returned.set()
        for watcher in watchers:
            watcher.join(timeout=120)
    finally:
        done.set()
    return report, started, synced, seen
