"""The sync relay process: it dies and comes back, it goes when its service goes, and it can be
left out (--sync-relay off)."""

from __future__ import annotations

import os
import signal

import grpc
import numpy as np
import tritonclient.grpc as triton

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
    client = triton.InferenceServerClient(inference.data)
    x = triton.InferInput("x", [1, 8], "FP32")
    x.set_data_from_numpy(np.zeros((1, 8), dtype=np.float32))
    out = client.infer("stamp", [x]).as_numpy("means")
    assert out is not None
    return set(out.ravel().tolist())


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


def test_pushes_still_work_in_process(services: Services) -> None:
    inference = services.inference(STAMP, "--sync-relay", "off")
    assert inference.relay_pid is None
    trainer = services.trainer(STAMP, [inference], "--max-runs", "2")
    assert trainer.wait(timeout=120) == 0, services.log("trainer")
    assert inference.model_state("stamp").version == 3  # the first full push, then two runs
    assert stamp_means(inference) == {2.0}
