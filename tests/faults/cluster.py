"""The real processes a schedule runs against: one inference service (with or without its sync
relay) on a state directory (`disk.py`), and trainer processes; started through
devtools/launch.py like every test's and bench's.

Every process started here, and every relay the service starts, is stopped by `close()`, which
the harness calls in a `finally`; the state disk is unmounted there too.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np

from devtools import launch
from shared.gen.inference import grpc_service_pb2 as oip
from shared.gen.inference import grpc_service_pb2_grpc as oip_grpc
from shared.gen.weightsync.v1 import weightsync_pb2 as pb
from shared.gen.weightsync.v1 import weightsync_pb2_grpc as pb_grpc
from tests.faults import stamp
from tests.faults.disk import StateDisk

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 120.0  # generous: two slow cores, torch imported by every process
STOP_TIMEOUT_S = 60.0
RELAY_MODULE = "inference_service.syncplane.relay"
TRAINER_RUNS = 120  # trainer n pushes every tensor filled with n: stays within stamp.MAX_FILL
# If the service has a setting that ends a push whose sender went silent, schedules use it
# (short) and check that stalled pushes end; the flag is looked up, not assumed.
IDLE_WORDS = ("idle", "stall", "silent")


def wait_for(predicate: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    """Poll `predicate` until it holds (True) or `timeout` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def gone(pid: int) -> bool:
    return not alive(pid)


def children(pid: int, marker: str) -> list[int]:
    """Live child processes of `pid` whose command line contains `marker`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid and fields[0] != "Z" and marker in cmdline:
            found.append(int(entry.name))
    return found


def idle_timeout_flag() -> str | None:
    """The service's flag that ends silent pushes, if it has one."""
    try:
        from inference_service.settings import OPTIONS
    except ImportError:
        return None
    for option in OPTIONS:
        flag = getattr(option, "flag", None) or ""
        if "push" in flag and any(word in flag for word in IDLE_WORDS):
            return str(flag)
    return None


class ServiceDown(Exception):
    """The inference service did not start (or answer) in time."""


class Cluster:
    def __init__(self, root: Path, relay: bool, idle_s: float) -> None:
        self.root = root
        self.relay = relay
        self.state = root / "state"
        self.model_dir = self.state / "models" / stamp.MODEL
        self.disk = StateDisk(self.state)
        self.env = {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": str(ROOT),
            "TEST_STAMP_MB": str(stamp.MEGABYTES),
            "WEIGHTSYNC_PREFETCH": "1",  # trainers send through the read-ahead thread
        }
        self.service: subprocess.Popen[bytes] | None = None
        self.incarnation = 0
        self.data_port = 0
        self.sync_port = 0
        self.relays: set[int] = set()  # every relay pid seen, to be sure they all end
        self.trainers: dict[int, subprocess.Popen[bytes]] = {}
        self.trainer_logs: dict[int, list[Path]] = {}
        self.idle_flag = idle_timeout_flag()
        self.idle_s = idle_s
        self._channels: list[grpc.Channel] = []
        self._sync: pb_grpc.WeightSyncStub | None = None
        self._data: oip_grpc.GRPCInferenceServiceStub | None = None

    # -- the inference service -----------------------------------------------------------------

    @property
    def sync_address(self) -> str:
        return f"127.0.0.1:{self.sync_port}"

    def service_log(self, incarnation: int | None = None) -> Path:
        return self.root / f"service-{self.incarnation if incarnation is None else incarnation}.log"

    def start_service(self) -> None:
        """Start the service on the state directory (on the ports it had, after the first)."""
        last = ""
        for _ in range(10):  # the old process's ports may take a moment to be free again
            self.incarnation += 1
            if self._try_start():
                return
            last = self.service_log().read_text(errors="replace")[-3000:]
            if "address" not in last.lower() and "port" not in last.lower():
                break
            wait_for(self._ports_free, 10)
        raise ServiceDown(f"the inference service did not start:\n{last}")

    def _ports_free(self) -> bool:
        for port in (self.data_port, self.sync_port):
            if not port:
                continue
            with socket.socket() as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    probe.bind(("127.0.0.1", port))
                except OSError:
                    return False
        return True

    def _try_start(self) -> bool:
        ready = self.root / f"service-{self.incarnation}.ready.json"
        flags = [
            "--listen",
            f"127.0.0.1:{self.data_port}",
            "--sync-listen",
            f"127.0.0.1:{self.sync_port}",
            "--metrics-listen",
            "off",
            "--sync-relay",
            "on" if self.relay else "off",
            "--state-dir",
            str(self.state),
            "--grace",
            "5",
        ]
        if self.idle_flag is not None:
            flags += [self.idle_flag, str(self.idle_s)]
        log = self.service_log()
        process = launch.spawn(launch.inference_command(stamp.APP, ready, *flags), self.env, log)
        self.service = process
        try:
            ports = launch.wait_for(
                process,
                lambda: launch.read_json(ready),
                what="the inference service",
                timeout=START_TIMEOUT_S,
                log=log,
            )
        except launch.NotReadyError as exc:
            if process.poll() is None:  # not ready in time
                launch.kill(process)
                raise ServiceDown(str(exc)) from None
            return False  # it exited: the caller looks at why
        self.data_port, self.sync_port = int(ports["data_port"]), int(ports["sync_port"])
        if ports.get("sync_relay_pid"):
            self.relays.add(int(ports["sync_relay_pid"]))
        self._connect()
        return True

    def _connect(self) -> None:
        for channel in self._channels:
            channel.close()
        sync = grpc.insecure_channel(self.sync_address)
        data = grpc.insecure_channel(f"127.0.0.1:{self.data_port}")
        self._channels = [sync, data]
        self._sync = pb_grpc.WeightSyncStub(sync)
        self._data = oip_grpc.GRPCInferenceServiceStub(data)

    def service_alive(self) -> bool:
        return self.service is not None and self.service.poll() is None

    def stop_service(self, graceful: bool) -> int | None:
        """SIGTERM (waiting for the drain) or SIGKILL; wait until it and its relays are gone."""
        process = self.service
        if process is None:
            return None
        if graceful:
            launch.stop(process, STOP_TIMEOUT_S)
        else:
            launch.kill(process)
        self._end_relays()
        return process.returncode

    def relay_pid(self) -> int | None:
        if self.service is None:
            return None
        found = children(self.service.pid, RELAY_MODULE)
        self.relays.update(found)
        return max(found) if found else None

    def kill_relay(self) -> int | None:
        """kill -9 the relay; return its pid (None: no relay running)."""
        pid = self.relay_pid()
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
            wait_for(lambda: not alive(pid), 30)
        return pid

    def relay_back(self, old: int, timeout: float = 60.0) -> bool:
        """Wait until a new relay runs and the sync plane answers through it."""

        def back() -> bool:
            pid = self.relay_pid()
            return pid is not None and pid != old

        return wait_for(back, timeout, 0.1) and self.get_model(timeout) is not None

    def _end_relays(self) -> None:
        """A relay exits when its service dies; make sure, and kill any that lingers."""
        for pid in list(self.relays):
            if not wait_for(functools.partial(gone, pid), 30):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                wait_for(functools.partial(gone, pid), 10)
            self.relays.discard(pid)

    # -- talking to it -------------------------------------------------------------------------

    def get_model(self, timeout: float = 60.0) -> pb.ModelState | None:
        """GetModel, waiting for the service to answer; None if it never does."""
        assert self._sync is not None
        deadline = time.monotonic() + timeout
        while True:
            try:
                state: pb.ModelState = self._sync.GetModel(
                    pb.GetModelRequest(model_name=stamp.MODEL),
                    timeout=max(1.0, deadline - time.monotonic()),
                    wait_for_ready=True,
                )
                return state
            except grpc.RpcError as error:
                if time.monotonic() > deadline or error.code() not in (
                    grpc.StatusCode.UNAVAILABLE,
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                ):
                    return None
                time.sleep(0.1)

    def infer(self) -> tuple[int, stamp.Fills] | grpc.RpcError:
        """The data plane's answer to a fixed input: the version it names and the 8 means."""
        assert self._data is not None
        request = oip.ModelInferRequest(model_name=stamp.MODEL)
        request.inputs.add(name="x", datatype="FP32", shape=[1, 8])
        request.raw_input_contents.append(bytes(32))
        try:
            response = self._data.ModelInfer(request, timeout=60, wait_for_ready=True)
        except grpc.RpcError as error:
            return error
        means = np.frombuffer(response.raw_output_contents[0], dtype="<f4")
        fills = tuple(int(v) if float(v).is_integer() else -1 for v in means.tolist())
        return int(response.model_version), fills

    def lease_file(self) -> tuple[int, str] | str | None:
        """writer.json as (epoch, holder); None if absent; a string if unreadable."""
        path = self.model_dir / "writer.json"
        try:
            lease = json.loads(path.read_text())
            return int(lease["epoch"]), str(lease["holder"])
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            return f"unreadable: {exc}"

    # -- trainers ------------------------------------------------------------------------------

    def start_trainer(self, index: int, trainer_id: str) -> subprocess.Popen[bytes]:
        logs = self.trainer_logs.setdefault(index, [])
        log = self.root / f"{trainer_id}-{len(logs)}.log"
        logs.append(log)
        flags = [
            "--trainer-id",
            trainer_id,
            "--metrics-listen",
            "off",
            "--run-interval",
            "0.25",
            "--max-runs",
            str(TRAINER_RUNS),
            "--push-timeout",
            "60",
        ]
        command = launch.trainer_command(stamp.APP, [self.sync_address], *flags)
        process = launch.spawn(command, self.env, log)
        self.trainers[index] = process
        return process

    def trainer_alive(self, index: int) -> bool:
        process = self.trainers.get(index)
        return process is not None and process.poll() is None

    def any_trainer_alive(self) -> bool:
        return any(p.poll() is None for p in self.trainers.values())

    def kill_trainer(self, index: int) -> None:
        process = self.trainers.get(index)
        if process is not None:
            launch.kill(process)

    # -- the end -------------------------------------------------------------------------------

    def close(self) -> list[str]:
        """Stop everything started, unmount the state disk; return what could not be cleaned."""
        for process in self.trainers.values():
            launch.kill(process)
        if self.service is not None:
            self.stop_service(graceful=False)
        for channel in self._channels:
            channel.close()
        self._channels = []
        return self.disk.unmount()
