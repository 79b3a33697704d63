"""Faults a cluster throws: a connection cut mid-stream, an inference service killed mid-serve."""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import safetensors.torch

from shared import TorchTrainingModel, TrainingModelsDict
from shared.weights.digest import state_digest
from tests.integration.apps import MLP, SgdTrainer
from tests.integration.conftest import Inference, Services, wait_until
from trainer_service.checkpoint import Checkpoints

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
        with contextlib.suppress(OSError):  # wakes the accept (close alone does not)
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()

    def _accept(self) -> None:
        first = True
        while not self._closing:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target)
            except OSError:  # the target is gone: so is this client
                client.close()
                continue
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
    assert "retrying in about" in services.log("trainer")  # backed off, retried, got through
    assert inference.model_state("stamp").version == 3  # the retried catch-up, then two runs


def test_an_inference_service_killed_mid_serve_restarts_on_its_last_written_version(
    services: Services, tmp_path: Path
) -> None:
    services.env["TEST_STAMP_MB"] = "8"
    state_dir = tmp_path / "state"
    inference = services.inference(STAMP, "--state-dir", str(state_dir), name="first")
    trainer = services.trainer(STAMP, [inference], "--run-interval", "0.05")
    wait_until(lambda: inference.model_state("stamp").version >= 6)
    # Freeze the trainer so that it cannot catch the restarted service up before the restored
    # weights are checked; it resumes below, its push in flight failing against the dead one.
    trainer.send_signal(signal.SIGSTOP)
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
    assert (restored.version, restored.digest) == (stored_version, stored_digest)
    trainer.send_signal(signal.SIGCONT)
    wait_until(lambda: again.model_state("stamp").version > stored_version)  # caught up
    assert trainer.poll() is None  # the trainer outlived the inference service it fed


def test_a_trainer_killed_mid_training_resumes_from_its_last_checkpoint(
    services: Services, tmp_path: Path
) -> None:
    state = tmp_path / "trainer-state"
    safetensors.torch.save_file(MLP().state_dict(), tmp_path / "frozen.safetensors")
    services.env["TEST_PRETRAINED"] = str(tmp_path / "frozen.safetensors")
    inference = services.inference("tests.integration.apps:pair")
    first = services.trainer(
        "tests.integration.apps:pair",
        [inference],
        "--state-dir",
        str(state),
        "--checkpoint-every",
        "1",
        "--run-interval",
        "0.05",
        name="first",
    )
    checkpoint = state / "checkpoint"
    wait_until(lambda: (checkpoint / "trainers" / "sgd" / "sgd.optim.safetensors").exists())
    wait_until(lambda: inference.model_state("mlp").version >= 5)
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=10)
    # What the second trainer resumes from: the newest complete checkpoint (a kill between
    # writing one and swapping it in leaves it beside the older `checkpoint`).
    newest = Checkpoints(state).current()
    assert newest is not None
    shutil.copytree(newest, tmp_path / "at-kill")  # the second trainer will overwrite it
    at_kill = tmp_path / "at-kill"
    saved = safetensors.torch.load_file(at_kill / "models" / "mlp.safetensors")
    optimizer = safetensors.torch.load_file(at_kill / "trainers" / "sgd" / "sgd.optim.safetensors")
    assert any("momentum_buffer" in key for key in optimizer)  # SGD momentum state, no pickle
    served_before = inference.model_state("mlp").version
    second = services.trainer(
        "tests.integration.apps:pair",
        [inference],
        "--state-dir",
        str(state),
        "--max-runs",
        "1",
        name="second",
    )
    assert second.wait(timeout=120) == 0, services.log("second")
    assert "resumed from" in services.log("second")
    after = inference.model_state("mlp")
    assert after.version == served_before + 2  # its catch-up sync, then one run

    # The same run, replayed here from the checkpoint (weights and optimizer state), must give
    # bit-exactly what was served: the trainer resumed from both, not from scratch.
    model = TorchTrainingModel(MLP(), has_inference_model=False)
    model.model.load_state_dict(saved)
    replay = SgdTrainer()
    replay.attach_training_models(TrainingModelsDict({"mlp": model}))
    replay.load_state(at_kill / "trainers" / "sgd")
    replay.setup()
    replay.train()
    assert state_digest(model.model.state_dict()) == after.digest
