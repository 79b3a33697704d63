"""The publisher against real in-process gRPC servers: full, delta, fallback, many targets."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import pytest
import torch
from torch import nn

from inference_service.__main__ import build_server
from inference_service.served_model import ServedModel
from inference_service.settings import InferenceSettings
from shared.app import ModelSpec, TensorSpec
from shared.weights.digest import state_digest
from trainer_service.publisher import Publisher
from trainer_service.sync_errors import SyncFailedError

SPEC = ModelSpec(
    "m",
    lambda: None,  # type: ignore[arg-type,return-value]
    (TensorSpec("x", "FP32", (-1, 8)),),
    (TensorSpec("y", "FP32", (-1, 8)),),
)


# Long enough for a live target to answer on a loaded host (CI ran the whole suite when a
# first contact took over 0.5 s, which left it lagging before the test stopped the other), short
# enough that probing a stopped one keeps the tests quick.
CONNECT_S = 2.0


def fresh() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(8, 8) for _ in range(5)])


class Target:
    """An inference service in this process, on a free port (or a given one)."""

    def __init__(self, port: int = 0, module: nn.Module | None = None) -> None:
        served = ServedModel(SPEC, module or fresh(), lambda m, x: m(x), True, torch.device("cpu"))
        self.model = served
        settings = InferenceSettings(
            models="-",
            listen="127.0.0.1:0",
            sync_listen=f"127.0.0.1:{port}",
            metrics_listen=None,
            sync_nice=0,
            sync_relay="on",
        )
        self.server = build_server(settings, {"m": served})
        self.port = self.server.start().sync
        self.address = f"127.0.0.1:{self.port}"
        self.stopped = False

    def stop(self) -> None:
        if not self.stopped:
            self.stopped = True
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


def restart(targets: list[Target], index: int) -> None:
    """Stop target `index` (if running) and start a fresh one, no state kept, on its address."""
    port = targets[index].port
    targets[index].stop()
    targets[index] = Target(port)


def wait_until(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def trained() -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() + 1 for k, v in fresh().state_dict().items()}


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


def test_a_dead_target_lags_while_the_others_commit_and_is_caught_up_in_the_background(
    targets: list[Target], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="trainer_service")
    publisher = Publisher([t.address for t in targets], "trainer-x", connect_timeout_s=CONNECT_S)
    state = trained()
    publisher.publish("m", state)
    targets[1].stop()
    state[next(iter(state))] += 1
    report = publisher.publish("m", state)
    assert (report.version, report.targets, report.lagging) == (2, 1, (targets[1].address,))
    targets[0].assert_serves(state, 2)
    published = {k: v.clone() for k, v in state.items()}
    state[next(iter(state))] += 1  # training goes on; the catch-up sends what was published
    restart(targets, 1)  # it comes back empty; no sync happens, yet it is caught up
    wait_until(lambda: targets[1].model.live.version == 2)
    targets[1].assert_serves(published, 2)
    # It commits before the trainer hears so: a sync in between would still find it lagging.
    wait_until(lambda: any(f"{targets[1].address} caught up" in m for m in caplog.messages))
    report = publisher.publish("m", state)
    assert (report.version, report.targets, report.lagging) == (3, 2, ())
    for target in targets:
        target.assert_serves(state, 3)
    publisher.close()


def test_a_lagging_target_is_caught_up_from_a_holder_else_directly(
    targets: list[Target], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="trainer_service")
    targets.append(Target())
    publisher = Publisher([t.address for t in targets], "trainer-x", connect_timeout_s=CONNECT_S)
    state = trained()
    publisher.publish("m", state)
    targets[1].stop()
    state[next(iter(state))] += 1
    assert publisher.publish("m", state).lagging == (targets[1].address,)
    restart(targets, 1)  # back empty: a holder of version 2 seeds it
    wait_until(lambda: targets[1].model.live.version == 2)
    targets[1].assert_serves(state, 2)
    donors = {targets[0].address, targets[2].address}
    wait_until(lambda: any(f"{targets[1].address} caught up from " in m for m in caplog.messages))
    [line] = [m for m in caplog.messages if f"{targets[1].address} caught up from " in m]
    assert line.split(" caught up from ", 1)[1].split(" ", 1)[0] in donors

    # Every holder gone: the seed fails, and the trainer pushes the lagging one itself.
    targets[2].stop()
    state[next(iter(state))] += 1
    assert publisher.publish("m", state).lagging == (targets[2].address,)
    targets[0].stop()
    targets[1].stop()
    restart(targets, 2)
    wait_until(lambda: targets[2].model.live.version == 3)
    targets[2].assert_serves(state, 3)
    assert any("pushing it directly" in m for m in caplog.messages)
    wait_until(lambda: any(f"{targets[2].address} caught up at" in m for m in caplog.messages))
    publisher.close()
    for target in targets:
        target.stop()


def test_a_sync_that_reaches_no_target_fails(targets: list[Target]) -> None:
    publisher = Publisher([t.address for t in targets], "trainer-x", connect_timeout_s=0.5)
    state = trained()
    publisher.publish("m", state)
    for target in targets:
        target.stop()
    with pytest.raises(SyncFailedError, match="version 2: no inference service could be reached"):
        publisher.publish("m", state)
    publisher.close()


def test_a_target_that_answers_with_a_refusal_fails_the_sync(targets: list[Target]) -> None:
    other = Target(module=nn.Sequential(nn.Linear(8, 4)))  # serves other shapes: INVALID_ARGUMENT
    try:
        publisher = Publisher([targets[0].address, other.address], "trainer-x")
        state = trained()
        with pytest.raises(SyncFailedError, match=r"not committed everywhere.*INVALID_ARGUMENT"):
            publisher.publish("m", state)
        targets[0].assert_serves(state, 1)  # the other target committed it
        assert other.model.live.version == 0
        publisher.close()
    finally:
        other.stop()


def test_a_restarted_target_is_acquired_again_and_gets_a_full_push(
    targets: list[Target],
) -> None:
    publisher = Publisher([t.address for t in targets], "trainer-x")
    state = trained()
    publisher.publish("m", state)
    publisher.publish("m", state)
    # No state kept: it serves version 0 (no base for a delta), granted no lease, and refuses
    # epoch 1 as unknown.
    restart(targets, 1)
    assert (targets[1].model.live.version, targets[1].model.lease.snapshot()) == (0, (0, ""))
    state[next(iter(state))] += 1
    report = publisher.publish("m", state)
    assert (report.version, report.targets) == (3, 2)
    assert targets[1].model.lease.snapshot() == (1, "trainer-x")  # granted again, then pushed
    for target in targets:
        target.assert_serves(state, 3)
    publisher.close()


def test_a_target_that_comes_back_within_the_retries_still_gets_the_version(
    targets: list[Target],
) -> None:
    import threading

    # Direct pushes: a hop of a chain reported unreachable lags at once (trainer_service/chain.py).
    # The push waits up to the connect timeout for the target to answer: 10 s, so that it is back
    # within it even on a loaded host, where starting it again may take a few seconds.
    publisher = Publisher(
        [t.address for t in targets],
        "trainer-x",
        connect_timeout_s=10,
        retry_delay_s=0.5,
        fanout="direct",
    )
    state = trained()
    publisher.publish("m", state)
    port = targets[1].port
    targets[1].stop()
    revived: list[Target] = []
    timer = threading.Timer(0.3, lambda: revived.append(Target(port)))
    timer.start()
    state[next(iter(state))] += 1
    report = publisher.publish("m", state)  # waits for the target to answer again
    timer.join()
    targets[1] = revived[0]
    assert report.version == 2
    for target in targets:
        target.assert_serves(state, 2)
    publisher.close()
