"""The inference service's side of the sync relay: start and supervise the relay process,
and serve the pushes it relays.

The relay (relay/process.py) owns the sync plane's public address; this module starts it,
accepts its push links on a Unix socket in a private directory, and hands each relayed push's
parts to the push handler (syncplane/handler.py), the one a push received here goes through,
answering with the same statuses. Calls other than Push reach the service's own sync server,
which then listens on a Unix socket in the same directory (the address `open()` returns). A
thread of its own answers the relay's heartbeats there too (pulse.py), so that the relay can
tell a stuck service from a busy one.
Should the relay die, it is started again on the port it had, with a growing wait between
attempts, for as long as the service runs.
"""

from __future__ import annotations

import json
import logging
import os
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from inference_service.syncplane.handler import PushHandler
from inference_service.syncplane.inbox import TICK_S
from inference_service.syncplane.relay.frames import Answer
from inference_service.syncplane.relay.process import TOKEN_ENV, WEAKER_TOKEN_ENV
from inference_service.syncplane.relay.pulse import PulseAnswerer
from inference_service.syncplane.relay.service_end import PushStream, ServiceLink
from shared.cpus import available_cpus
from shared.grpc.auth import TlsFiles
from shared.grpc.errors import failure
from shared.grpc.server import lower_thread_priority

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[3]
START_TIMEOUT_S = 30.0
RESTART_DELAY_S = 0.1  # before starting a dead relay again; doubled while it keeps dying
MAX_RESTART_DELAY_S = 30.0
# A relay that ran this long before dying starts again at once: one dying sooner is in a crash
# loop (an outside review saw a relay killed after 40 s of healthy service wait 25.6 s under
# 60 s, its port refusing every push meanwhile).
STEADY_S = 10.0
# How long a stopping relay may take to end once its calls have had the grace: one that does
# not (stopped, hung) is killed. It exits in well under a second.
EXIT_MARGIN_S = 2.0
# The relay copies each pushed byte once more (into the shared ring): where CPUs are few that
# costs push speed, with cores to spare it costs none, so `auto` relays from this many CPUs up.
RELAY_MIN_CPUS = 4


def relay_wanted(setting: str) -> bool:
    """`--sync-relay`: on, off, or auto (on where this process may use RELAY_MIN_CPUS)."""
    if setting in ("on", "off"):
        return setting == "on"
    return available_cpus() >= RELAY_MIN_CPUS


@dataclass(frozen=True)
class RelayConfig:
    listen: str
    max_concurrent: int = 8
    nice: int = 0
    tls: TlsFiles | None = None
    token: str | None = None
    weaker_token: str | None = None
    log_level: str = "INFO"


class RelaySupervisor:
    """Starts the relay process, starts it again should it die, stops it; serves its pushes
    with `handler`."""

    def __init__(self, handler: PushHandler, config: RelayConfig) -> None:
        self._handler = handler
        self._config = config
        self._dir = ""
        self._links_path = ""
        self._listener: socket.socket | None = None
        self._pulse: PulseAnswerer | None = None
        self._process: subprocess.Popen[str] | None = None
        self._stopping = threading.Event()
        self.port = 0

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def open(self) -> str:
        """Make the private directory and the push link socket; return the address the
        service's own sync server must listen on (a Unix socket there)."""
        self._dir = tempfile.mkdtemp(prefix="weightsync-sync-")  # mode 0700: ours alone
        self._links_path = f"{self._dir}/push.sock"
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(self._links_path)
        self._listener.listen(64)
        self._pulse = PulseAnswerer(f"{self._dir}/pulse.sock")
        return f"unix:{self._dir}/sync.sock"

    def start(self) -> int:
        """Start the relay on the configured address; return the port it listens on."""
        threading.Thread(target=self._accept, name="push-links", daemon=True).start()
        assert self._pulse is not None
        self._pulse.start()
        try:
            self.port = self._spawn(self._config.listen)
        except OSError:
            self._close()
            raise
        threading.Thread(target=self._supervise, name="sync-relay", daemon=True).start()
        return self.port

    def stop(self, grace: float) -> None:
        """Let the relay finish its calls for up to `grace` seconds, then end it."""
        self._stopping.set()
        process = self._process
        if process is not None and process.stdin is not None:
            try:
                process.stdin.write(f"stop {grace}\n")
                process.stdin.close()
            except OSError:
                pass
            try:
                process.wait(grace + EXIT_MARGIN_S)
            except subprocess.TimeoutExpired:
                logger.warning("the sync relay did not stop in time; killing it")
                process.kill()
                process.wait()
        self._close()

    def _close(self) -> None:
        if self._listener is not None:
            self._listener.close()
        if self._pulse is not None:
            self._pulse.close()
        if self._dir:
            shutil.rmtree(self._dir, ignore_errors=True)

    def _spawn(self, listen: str) -> int:
        config = self._config
        tls = config.tls or TlsFiles()
        command = [
            sys.executable,
            "-m",
            "inference_service.syncplane.relay.process",
            f"--listen={listen}",
            f"--upstream={self._dir}/sync.sock",
            f"--links={self._links_path}",
            f"--pulse={self._dir}/pulse.sock",
            f"--max-concurrent={config.max_concurrent}",
            f"--nice={config.nice}",
            f"--log-level={config.log_level}",
        ]
        for flag, path in (("cert", tls.cert), ("key", tls.key), ("client-ca", tls.ca)):
            if path is not None:
                command.append(f"--tls-{flag}={path}")
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        for name, value in ((TOKEN_ENV, config.token), (WEAKER_TOKEN_ENV, config.weaker_token)):
            if value:
                env[name] = value
        process = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True
        )
        assert process.stdout is not None
        ready, _, _ = select.select([process.stdout], [], [], START_TIMEOUT_S)
        line = process.stdout.readline() if ready else ""
        info = json.loads(line) if line.startswith("{") else {}
        if "port" not in info:
            process.kill()
            process.wait()
            raise OSError(info.get("error") or f"the sync relay did not start on {listen}")
        self._process = process
        logger.info("sync relay (pid %d) on port %d", process.pid, info["port"])
        return int(info["port"])

    def _supervise(self) -> None:
        """Start the relay again, on the same port, should it die while the service runs; one
        that keeps dying soon after its start is started again less and less often."""
        delay = RESTART_DELAY_S
        while not self._stopping.is_set():
            assert self._process is not None
            started = time.monotonic()
            code = self._process.wait()
            if self._stopping.is_set():
                return
            if time.monotonic() - started > STEADY_S:
                delay = RESTART_DELAY_S
            logger.error(
                "the sync relay exited (status %s); starting it again in %.1fs", code, delay
            )
            if self._stopping.wait(delay):
                return
            delay = min(delay * 2, MAX_RESTART_DELAY_S)
            host = self._config.listen.rsplit(":", 1)[0]
            while True:  # until it starts (its port may be held a while) or the service stops
                try:
                    self._spawn(f"{host}:{self.port}")
                    break
                except OSError as exc:
                    logger.error(
                        "cannot start the sync relay again: %s; trying again in %.1fs", exc, delay
                    )
                if self._stopping.wait(delay):
                    return
                delay = min(delay * 2, MAX_RESTART_DELAY_S)

    def _accept(self) -> None:
        assert self._listener is not None
        while True:
            try:
                sock, _ = self._listener.accept()
            except OSError:  # closed by stop()
                return
            link = threading.Thread(target=self._serve, args=(sock,), name="push-link", daemon=True)
            link.start()

    def _serve(self, sock: socket.socket) -> None:
        """Run the pushes that come over one link, one after another."""
        lower_thread_priority(self._config.nice)
        try:
            link = ServiceLink(sock)
        except OSError as exc:
            logger.warning("refused a push link: %s", exc)
            return
        try:
            for stream in link.pushes():
                stream.answer(self._push(stream))
        except OSError as exc:  # the relay went away, mid-push (the push was not committed)
            logger.warning("a push link broke: %s", exc)
        finally:
            link.close()

    def _push(self, stream: PushStream) -> Answer:
        """One push, with the statuses and log lines of the sync servicer's Push."""
        try:
            return self._handler.handle(stream.waiting(TICK_S))
        except OSError:  # the link broke
            raise
        except Exception as error:
            return failure(error, "WeightSyncServicer.Push")
