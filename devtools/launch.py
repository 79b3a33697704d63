"""Start the services as child processes, wait until they are ready, and stop them.

The one way the integration tests, the benches and the demo start processes (it imports nothing
from pytest): `inference_command` and `trainer_command` build the command lines, `spawn` runs
one in the repository root, its output in a log file, `wait_for` polls until a process is ready
and fails with the end of its log if it exits first or takes too long, and `stop` ends it
(SIGTERM, then SIGKILL after a grace period; `kill`: SIGKILL at once). `Launcher` does all of
that for a set of processes: an inference service (and a trainer started with
`start_experience_trainer`) is ready once its `--ready-file` appears, and every process it
started is stopped at the end.

It sits at the top of the repository, beside the three folders that use it: in `tests/` it would
make the benches and the demo depend on the test suite, in `bench/` the tests on the benches;
and it is no product code, so it is not in `shared/` and is not installed (pyproject.toml
packages `shared`, `inference_service` and `trainer_service` only). `python -m bench.x` and
pytest find it from the repository root; `scripts/demo.py` puts the root on its path.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self, TypeVar

ROOT = Path(__file__).resolve().parent.parent
LOOPBACK = "127.0.0.1"
TAIL_LINES = 60  # of a log, in an error
# Either service logging warnings only and serving no metrics: the benches' and the demo's.
QUIET = ("--log-level", "WARNING", "--metrics-listen", "off")

T = TypeVar("T")


class NotReadyError(RuntimeError):
    """A process exited before it was ready, or was not ready in time."""


def inference_command(app: str, ready_file: Path, *extra: str) -> list[str]:
    """`python -m inference_service` serving `app` on the CPU, both planes on free loopback
    ports, which it writes to `ready_file` once it serves; `extra` flags after (and so over)
    these."""
    return [
        sys.executable,
        "-m",
        "inference_service",
        "--models",
        app,
        "--listen",
        f"{LOOPBACK}:0",
        "--sync-listen",
        f"{LOOPBACK}:0",
        "--device",
        "cpu",
        "--ready-file",
        str(ready_file),
        *extra,
    ]


def trainer_command(app: str, targets: Sequence[str], *extra: str) -> list[str]:
    """`python -m trainer_service` training `app` on the CPU and pushing to the sync planes at
    `targets`; `extra` flags after (and so over) these."""
    return [
        sys.executable,
        "-m",
        "trainer_service",
        "--models",
        app,
        "--device",
        "cpu",
        "--inference",
        ",".join(targets),
        *extra,
    ]


def spawn(
    command: Sequence[str], env: Mapping[str, str], log: Path | None = None, *, nice: int = 0
) -> subprocess.Popen[bytes]:
    """Run `command` in the repository root with exactly `env`. Its output, stderr included,
    goes to `log` (replaced), or to this process's own output when None. `nice`: run it at
    that much lower a CPU priority."""
    lower = (lambda: os.nice(nice)) if nice else None
    if log is None:
        return subprocess.Popen(command, cwd=ROOT, env=env, preexec_fn=lower)
    with log.open("wb") as out:
        return subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, preexec_fn=lower
        )


def tail(log: Path | None, lines: int = TAIL_LINES) -> str:
    """The last `lines` lines of `log`, to show why a process failed."""
    if log is None:
        return "(its output is above)"
    try:
        text = log.read_text(errors="replace")
    except OSError as exc:
        return f"(cannot read its log: {exc})"
    last = text.splitlines()[-lines:]
    return "\n".join(last) if last else "(its log is empty)"


def wait_for(
    process: subprocess.Popen[bytes],
    ready: Callable[[], T],
    *,
    what: str,
    timeout: float,
    log: Path | None = None,
    interval: float = 0.05,
) -> T:
    """Call `ready` until it returns something true, and return that. NotReadyError, naming
    `what` and showing the end of `log`, if `process` exits first or `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    while True:
        found = ready()
        if found:
            return found
        code = process.poll()
        if code is not None:
            problem = f"exited with code {code} before it was ready"
        elif time.monotonic() > deadline:
            problem = f"was not ready after {timeout:g}s"
        else:
            time.sleep(interval)
            continue
        where = f"; the end of {log}:" if log is not None else ""
        raise NotReadyError(f"{what} {problem}{where}\n{tail(log)}")


def read_json(path: Path) -> Any:
    """What a ready file says; None while there is none. The services write theirs whole
    (shared/grpc/server.py `write_ready_file`)."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None


def stop(process: subprocess.Popen[bytes], grace: float = 20.0) -> int:
    """SIGTERM (unless it has exited), up to `grace` seconds to exit, then SIGKILL; its exit
    status."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    return _reap(process, grace)


def kill(process: subprocess.Popen[bytes]) -> int:
    """SIGKILL (unless it has exited); its exit status."""
    if process.poll() is None:
        process.kill()
    return process.wait()


def _reap(process: subprocess.Popen[bytes], grace: float) -> int:
    try:
        return process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait()


@dataclass(frozen=True)
class Service:
    """An inference service that `Launcher.start_inference` started, serving."""

    process: subprocess.Popen[bytes]
    ready: dict[str, Any]  # its ready file: pid, data_port, sync_port, metrics_port, ...
    log: Path | None

    @property
    def data(self) -> str:
        return f"{LOOPBACK}:{self.ready['data_port']}"

    @property
    def sync(self) -> str:
        return f"{LOOPBACK}:{self.ready['sync_port']}"

    @property
    def metrics_url(self) -> str | None:
        port = self.ready.get("metrics_port")
        return None if port is None else f"http://{LOOPBACK}:{port}/metrics"

    @property
    def relay_pid(self) -> int | None:
        """Its sync relay process; None when it runs the sync plane in-process."""
        pid = self.ready.get("sync_relay_pid")
        return None if pid is None else int(pid)


class Launcher:
    """Processes started in the repository root, all with the environment `env`, and stopped
    together at the end (`stop_all`, or leaving a `with` block): SIGTERM to all, then up to
    `grace` seconds for each to exit before SIGKILL.

    Ready files go to `directory`, and with `logs` each process's output too, as
    `<name>.log`; without, processes write to this process's own output."""

    def __init__(
        self, directory: Path, env: Mapping[str, str], *, logs: bool = True, grace: float = 20.0
    ) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.env = dict(env)
        self.logs = logs
        self.grace = grace
        self.processes: list[subprocess.Popen[bytes]] = []

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()

    def log_path(self, name: str) -> Path | None:
        return self.directory / f"{name}.log" if self.logs else None

    def spawn(
        self,
        command: Sequence[str],
        name: str,
        *,
        nice: int = 0,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start `command` (see `spawn`), its output in the log `name`; `env`: variables set
        over the launcher's for this process alone."""
        process = spawn(command, {**self.env, **(env or {})}, self.log_path(name), nice=nice)
        self.processes.append(process)
        return process

    def start_inference(
        self, app: str, *extra: str, name: str = "inference", timeout: float = 60.0
    ) -> Service:
        """An inference service (see `inference_command`), once its ready file is written;
        NotReadyError with the end of its log if it exits first or takes over `timeout`."""
        ready = self._ready_file(name)
        process = self.spawn(inference_command(app, ready, *extra), name)
        found = self._wait_ready(process, ready, f"inference service {name!r}", name, timeout)
        return Service(process, found, self.log_path(name))

    def start_trainer(
        self, app: str, targets: Sequence[str], *extra: str, name: str = "trainer"
    ) -> subprocess.Popen[bytes]:
        """A trainer service (see `trainer_command`), started."""
        return self.spawn(trainer_command(app, targets, *extra), name)

    def start_experience_trainer(
        self,
        app: str,
        targets: Sequence[str],
        *extra: str,
        name: str = "trainer",
        timeout: float = 60.0,
    ) -> str:
        """Start a trainer service with its experience plane on a free loopback port, and once
        its ready file is written return that plane's address (the process is stopped with the
        others). NotReadyError with the end of its log if it exits first or takes over
        `timeout`."""
        ready = self._ready_file(name)
        listen = ("--experience-listen", f"{LOOPBACK}:0", "--ready-file", str(ready))
        process = self.start_trainer(app, targets, *listen, *extra, name=name)
        found = self._wait_ready(process, ready, f"trainer service {name!r}", name, timeout)
        return f"{LOOPBACK}:{found['experience_port']}"

    def _ready_file(self, name: str) -> Path:
        ready = self.directory / f"{name}.ready.json"
        ready.unlink(missing_ok=True)  # a process started before under the same name
        return ready

    def _wait_ready(
        self, process: subprocess.Popen[bytes], ready: Path, what: str, name: str, timeout: float
    ) -> Any:
        """The ready file's contents once `process` has written it (see `wait_for`)."""
        return wait_for(
            process, lambda: read_json(ready), what=what, timeout=timeout, log=self.log_path(name)
        )

    def stop_all(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes:
            _reap(process, self.grace)
