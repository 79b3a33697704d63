"""The sync relay process: it dies and comes back, it goes when its service goes, and it can be
left out (--sync-relay off); a push it relays to a stopped service is given up."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import grpc
import numpy as np
import safetensors.torch
import tritonclient.grpc as triton

from tests.integration.apps import MLP
from tests.integration.catalogue import MB, Bench, assert_untouched
from tests.integration.conftest import Inference, Services, wait_until

STAMP = "tests.integration.apps:stamp"


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (exited, not yet reaped) counts as gone
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().rsplit(")", 1)[1].split()[0] != "Z"


def version(inference: Inference) -> int:
    try:
        return inference.model_state("stamp").version
    except grpc.RpcError:
        return -1


def stamp_means(inference: Inference) -> set[float]:
    """The served stamp model's output: one mean per tensor, all equal for one version."""
    return set(means(inference))


def test_a_killed_relay_comes_back_on_its_port_and_the_push_it_carried_changes_nothing(
    services: Services,
) -> None:
    services.env["TEST_STAMP_MB"] = "32"
    inference = services.inference(STAMP)
    assert inference.relay_pid is not None
    trainer = services.trainer(STAMP, [inference], "--run-interval", "0.05")
    wait_until(lambda: version(inference) >= 3)
    os.kill(inference.relay_pid, signal.SIGKILL)  # most likely mid-push: 32 MB every 50 ms
    wait_until(lambda: "the sync relay exited" in inference.log.read_text())
    reached = version(inference)
    wait_until(lambda: version(inference) >= reached + 3)  # same address; the trainer resumed
    assert len(stamp_means(inference)) == 1  # one whole version served, never a mix
    assert inference.process.poll() is None and trainer.poll() is None
    assert "Traceback" not in inference.log.read_text()


def test_the_relay_goes_when_its_service_is_killed(services: Services) -> None:
    inference = services.inference(STAMP)
    relay = inference.relay_pid
    assert relay is not None and alive(relay)
    inference.process.send_signal(signal.SIGKILL)
    inference.process.wait(timeout=10)
    wait_until(lambda: not alive(relay), timeout=10)


# A relay that cannot end (stopped, hung) held its service's SIGTERM for --grace plus 10 s (an
# outside review: 11.2 s with --grace 1); it is now killed 2 s after the grace.
def test_sigterm_kills_a_stopped_relay_soon_after_the_grace(services: Services) -> None:
    inference = services.inference(STAMP, "--grace", "1")
    relay = inference.relay_pid
    assert relay is not None
    os.kill(relay, signal.SIGSTOP)
    try:
        inference.process.send_signal(signal.SIGTERM)
        assert inference.process.wait(timeout=8) == 0
    finally:
        if alive(relay):
            os.kill(relay, signal.SIGKILL)
    assert "the sync relay did not stop in time; killing it" in inference.log.read_text()
    wait_until(lambda: not alive(relay), timeout=10)


def test_pushes_still_work_in_process(services: Services) -> None:
    inference = services.inference(STAMP, "--sync-relay", "off")
    assert inference.relay_pid is None
    trainer = services.trainer(STAMP, [inference], "--max-runs", "2")
    assert trainer.wait(timeout=120) == 0, services.log("trainer")
    assert inference.model_state("stamp").version == 3  # the first full push, then two runs
    assert stamp_means(inference) == {2.0}


def test_pushes_relayed_to_a_stopped_service_fail_unavailable_free_their_slots_and_apply_nothing(
    services: Services, tmp_path: Path
) -> None:
    pretrained = tmp_path / "frozen.safetensors"
    safetensors.torch.save_file(MLP().state_dict(), pretrained)
    services.env.update(TEST_PRETRAINED=str(pretrained), TEST_STAMP_MB=str(MB))
    inference = services.inference(
        "tests.integration.apps:catalogue",
        *("--sync-relay", "on", "--max-concurrent-pushes", "2"),
    )
    assert inference.relay_pid is not None
    bench = Bench(inference)  # version 1 served: tensor i filled with i
    assert means(inference) == [float(i) for i in range(8)]

    def push() -> list[bytes]:
        return [
            bench.header(version=2),
            bench.data_msg(bench.payload()),
            bench.commit(bench.good_digest()),
        ]

    os.kill(inference.process.pid, signal.SIGSTOP)  # its relay lives on
    try:
        # As many pushes as the relay takes at once, then one more: each is given up, and its
        # call slot freed, rather than held until the service runs again.
        first = [bench.push_raw.future(iter(push()), timeout=30) for _ in range(2)]
        errors = [future.exception() for future in first]
        errors.append(bench.push_raw.future(iter(push()), timeout=30).exception())
    finally:
        os.kill(inference.process.pid, signal.SIGCONT)
    for error in errors:
        assert isinstance(error, grpc.RpcError)
        assert error.code() == grpc.StatusCode.UNAVAILABLE, error
        details = error.details() or ""
        assert "stopped answering the sync relay during the push" in details, details
        assert f"pid {inference.process.pid}" in details and "stopped for" in details, details
    # Running again, it applies nothing of the pushes given up: version 1, bit-exact.
    assert_untouched(bench)
    assert means(inference) == [float(i) for i in range(8)]
    # and a new push through the same relay commits.
    assert bench.push_raw(iter(push()), timeout=30).version == 2
    assert means(inference) == [100.0 + i for i in range(8)]
    assert "Traceback" not in inference.log.read_text()


def means(inference: Inference) -> list[float]:
    """The served stamp model's output: the mean of each of its tensors."""
    client = triton.InferenceServerClient(inference.data)
    x = triton.InferInput("x", [1, 8], "FP32")
    x.set_data_from_numpy(np.zeros((1, 8), dtype=np.float32))
    out = client.infer("stamp", [x]).as_numpy("means")
    assert out is not None
    return [float(v) for v in out.ravel()]
