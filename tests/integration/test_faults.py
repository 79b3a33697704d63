"""Faults a cluster throws: a connection cut mid-stream, an inference service killed mid-serve."""

from __future__ import annotations

import contextlib
import signal
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import safetensors.torch

from shared.weights.digest import state_digest
from tests.integration.conftest import Inference, Services, wait_until

STAMP = "tests.integration.apps:stamp"


class CuttingProxy:
    """A TCP proxy to `target` that drops the first connection after `cut_after` bytes upstream."""

    def __init__(self, target: tuple[str, int], cut_after: int) -> None:
        self.target = target
        self.cut_after = cut_after
        self.cuts = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self._closing = False
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self._closing = True
        self._listener.close()

    def _accept(self) -> None:
        first = True
        while not self._closing:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            budget = self.cut_after if first else None
            first = False
            threading.Thread(
                target=self._pump, args=(client, upstream, budget), daemon=True
            ).start()
            threading.Thread(target=self._pump, args=(upstream, client, None), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, budget: int | None) -> None:
        sent = 0
        try:
            while data := source.recv(1 << 16):
                if budget is not None and sent + len(data) > budget:
                    self.cuts += 1
                    break
                sink.sendall(data)
                sent += len(data)
        except OSError:
            pass
        for s in (source, sink):  # an abrupt cut: both directions die
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()


@pytest.fixture
def proxy_factory() -> Iterator[list[CuttingProxy]]:
    made: list[CuttingProxy] = []
    yield made
    for proxy in made:
        proxy.close()


def test_a_connection_cut_mid_stream_changes_nothing_and_the_trainer_catches_up(
    services: Services, proxy_factory: list[CuttingProxy]
) -> None:
    services.env["TEST_STAMP_MB"] = "32"
    inference = services.inference(STAMP)
    host, port = inference.sync.rsplit(":", 1)
    proxy = CuttingProxy((host, int(port)), cut_after=8 << 20)
    proxy_factory.append(proxy)
    through = Inference(inference.process, inference.data, proxy.address, inference.log, "")
    trainer = services.trainer(STAMP, [through], "--max-runs", "2")
    assert trainer.wait(timeout=120) == 0, services.log("trainer")
    assert proxy.cuts == 1
    log = inference.log.read_text()
    assert "cancelled the push" in log or "without a commit" in log or "ended after" in log
    assert "initial sync failed" in services.log("trainer")  # it retried, and got through
    # version 1 was spent on the cut push (versions may skip, never repeat): then 2, 3, 4
    assert inference.model_state("stamp").version == 4


def test_an_inference_service_killed_mid_serve_restarts_on_its_last_written_version(
    services: Services, tmp_path: Path
) -> None:
    services.env["TEST_STAMP_MB"] = "8"
    state_dir = tmp_path / "state"
    inference = services.inference(STAMP, "--state-dir", str(state_dir), name="first")
    trainer = services.trainer(STAMP, [inference], "--run-interval", "0.05")
    wait_until(lambda: inference.model_state("stamp").version >= 6)
    inference.process.send_signal(signal.SIGKILL)
    inference.process.wait(timeout=10)

    files = sorted((state_dir / "models" / "stamp").glob("*.safetensors"))
    assert files, "no version reached the disk"
    newest = files[-1]
    stored_version = int(newest.stem)
    stored_digest = state_digest(safetensors.torch.load_file(newest))

    again = services.inference(  # same sync address, so the running trainer finds it again
        STAMP, "--state-dir", str(state_dir), "--sync-listen", inference.sync, name="second"
    )
    assert f"model stamp: restored version {stored_version} from" in again.log.read_text()
    restored = again.model_state("stamp")
    if restored.version == stored_version:  # (the trainer may already have caught it up)
        assert restored.digest == stored_digest
    wait_until(lambda: again.model_state("stamp").version > stored_version)  # caught up
    assert trainer.poll() is None  # the trainer outlived the inference service it fed
