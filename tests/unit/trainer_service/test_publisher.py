"""The publisher against real in-process gRPC servers: full, delta, fallback, many targets."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch import nn

from inference_service.served_model import ServedModel
from inference_service.server import InferenceServer
from shared.app import ModelSpec, TensorSpec
from shared.weights.digest import state_digest
from trainer_service.publisher import Publisher, SyncFailedError

SPEC = ModelSpec(
    "m",
    lambda: None,  # type: ignore[arg-type,return-value]
    (TensorSpec("x", "FP32", (-1, 8)),),
    (TensorSpec("y", "FP32", (-1, 8)),),
)


def module() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(8, 8) for _ in range(5)])


class Target:
    """An inference service in this process, on a free port (or a given one)."""

    def __init__(self, port: int = 0) -> None:
        served = ServedModel(SPEC, module(), lambda m, x: m(x), True, torch.device("cpu"))
        self.model = served
        self.server = InferenceServer(
            {"m": served}, listen="127.0.0.1:0", sync_listen=f"127.0.0.1:{port}"
        )
        self.port = self.server.start().sync
        self.address = f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.stop(0)

    def assert_serves(self, state: dict[str, torch.Tensor], version: int) -> None:
        live = self.model.live
        assert live.version == version
        assert live.digest == state_digest(state)
        for name, tensor in live.module.state_dict().items():
            assert torch.equal(tensor, state[name])


@pytest.fixture
def targets() -> Iterator[list[Target]]:
    running = [Target(), Target()]
    yield running
    for target in running:
        target.stop()


def trained() -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() + 1 for k, v in module().state_dict().items()}


def test_full_then_deltas_reach_every_target_bit_exactly(targets: list[Target]) -> None:
    publisher = Publisher([t.address for t in targets], "trainer-x")
    state = trained()
    first = publisher.publish("m", state)
    assert (first.version, first.targets) == (1, 2)
    names = list(state)
    sizes = []
    for version in range(2, 12):
        state[names[version % len(names)]] += 0.5  # one tensor changes per sync
        report = publisher.publish("m", state)
        assert report.version == version
        sizes.append(report.payload_bytes)
        for target in targets:
            target.assert_serves(state, version)
    assert max(sizes) < first.payload_bytes / 4  # deltas carry only the changed tensor
    unchanged = publisher.publish("m", state)
    assert unchanged.payload_bytes < 200  # nothing changed: a header and no tensor bytes
    publisher.close()


def test_full_resends_every_tensor_where_a_delta_would_do(targets: list[Target]) -> None:
    publisher = Publisher([t.address for t in targets], "trainer-x")
    state = trained()
    first = publisher.publish("m", state)
    again = publisher.publish("m", state, full=True)
    assert again.payload_bytes == first.payload_bytes  # every tensor again, to both targets
    assert publisher.publish("m", state).payload_bytes < 200  # and deltas resume after it
    for target in targets:
        target.assert_serves(state, 3)
    publisher.close()


def test_a_restarted_target_without_the_base_gets_a_full_push(targets: list[Target]) -> None:
    publisher = Publisher([t.address for t in targets], "trainer-x")
    state = trained()
    publisher.publish("m", state)
    publisher.publish("m", state)
    port = targets[1].port
    targets[1].stop()
    targets[1] = Target(port)  # same address, fresh service at version 0
    state[next(iter(state))] += 1
    report = publisher.publish("m", state)
    assert report.version == 3
    for target in targets:
        target.assert_serves(state, 3)
    publisher.close()


def test_a_dead_target_fails_the_sync_and_leaves_the_others_committed(
    targets: list[Target],
) -> None:
    publisher = Publisher([t.address for t in targets], "trainer-x", timeout_s=5, retries=0)
    state = trained()
    publisher.publish("m", state)
    targets[1].stop()
    state[next(iter(state))] += 1
    with pytest.raises(SyncFailedError, match="version 2 was not committed everywhere"):
        publisher.publish("m", state)
    targets[0].assert_serves(state, 2)
    port = targets[1].port
    targets[1] = Target(port)  # it comes back empty; the next sync catches it up
    report = publisher.publish("m", state)
    assert report.version == 3
    for target in targets:
        target.assert_serves(state, 3)
    publisher.close()


def test_a_target_that_comes_back_within_the_retries_still_gets_the_version(
    targets: list[Target],
) -> None:
    import threading

    publisher = Publisher([t.address for t in targets], "trainer-x", retry_delay_s=0.5)
    state = trained()
    publisher.publish("m", state)
    port = targets[1].port
    targets[1].stop()
    revived: list[Target] = []
    timer = threading.Timer(0.3, lambda: revived.append(Target(port)))
    timer.start()
    state[next(iter(state))] += 1
    report = publisher.publish("m", state)  # the first attempt fails; a retry finds it back
    timer.join()
    targets[1] = revived[0]
    assert report.version == 2
    for target in targets:
        target.assert_serves(state, 2)
    publisher.close()
