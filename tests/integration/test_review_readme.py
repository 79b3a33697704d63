"""Review (task D): the README's promises as a new user meets them, through the documented
Python client (`inference_service.client.InferenceClient`, docs/serving.md) and the services
started as real processes. Each test here failed on the tree it was written against."""

from __future__ import annotations

import subprocess
import sys

import grpc
import numpy as np
import pytest
import torch

from devtools.ports import free_port
from inference_service.client import InferenceClient
from shared import RemoteDataCollector
from shared.errors import ConfigurationError
from tests.integration.conftest import ROOT, Services

QUICKSTART = "examples.quickstart:app"  # the README's own model: x FP32 (-1, 1) -> y
TEXT = "tests.integration.apps:text"  # `words`: BYTES in, each string upper-cased back
ONLINE = "examples.online:app"  # the demo's app: buffer `experience` of x, y FP32 (1,)


@pytest.mark.timeout(60)
def test_client_refuses_a_port_past_65535_rather_than_reach_another_port(
    services: Services,
) -> None:
    """`weightsync-admin`, the health check, the trainer's --inference and every listen flag
    refuse a port outside 1 to 65535 (docs/operations.md: "rather than let gRPC dial 443 or the
    port modulo 65536"; shared/grpc/channel.py: "another port, perhaps another service,
    answering for it"). The typed client a user is pointed to does not: given port P + 65536 it
    dials P, and answers come back from whatever serves P, as if from the address given."""
    inference = services.inference(QUICKSTART)
    host, _, port = inference.data.rpartition(":")
    wrong = f"{host}:{int(port) + 65536}"  # no such port: it wraps round to `port`
    answered: object = None
    try:
        with InferenceClient(wrong, timeout_s=3) as client:
            answered = client.infer("quickstart", {"x": torch.zeros(1, 1)}).version
    except Exception:  # a refusal of the address, however raised, is what a user needs
        return
    pytest.fail(
        f"InferenceClient({wrong!r}) was answered (model_version {answered}) by the service "
        f"on {inference.data}: the port was taken modulo 65536 instead of refused"
    )


@pytest.mark.timeout(60)
def test_client_does_not_send_numeric_numpy_arrays_as_zero_filled_bytes(
    services: Services,
) -> None:
    """docs/serving.md: "`InferenceClient` is a typed client (torch tensors in and out, numpy
    arrays for BYTES)". Any numpy array that is not a torch tensor is packed as BYTES with
    `bytes(element)`: an integer element n becomes n zero bytes, a float its raw IEEE bytes, a
    negative integer raises a bare `ValueError: negative count`. A model taking BYTES then runs
    on garbage with no error anywhere. A typed client either encodes the array's values (as
    tritonclient's serialize_byte_tensor does, or refuses non-object arrays) or says it cannot;
    it never substitutes zero bytes for them."""
    inference = services.inference(TEXT)
    with InferenceClient(inference.data) as client:
        # Sent as what it is (INT64), which the model refuses, saying so.
        with pytest.raises(grpc.RpcError) as refused:
            client.infer("words", {"text": np.array([5, 12])})
        assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "'INT64'" in str(refused.value.details())
        with pytest.raises(TypeError, match="elements of a BYTES input are bytes or str"):
            client.infer("words", {"text": np.array([5, b"x"], dtype=object)})
        with pytest.raises(TypeError, match="give a torch tensor or a numpy array"):
            client.infer("words", {"text": ["a", "b"]})  # type: ignore[dict-item]
        result = client.infer("words", {"text": np.array(["ab", b"c"], dtype=object)})
        assert list(result.outputs["upper"].flat) == [b"AB", b"C"]
    quickstart = services.inference(QUICKSTART, name="quickstart")
    with InferenceClient(quickstart.data) as client:  # a numeric array goes in its dtype
        typed = client.infer("quickstart", {"x": np.zeros((2, 1), dtype=np.float32)})
        assert typed.outputs["y"].shape == (2, 1)


@pytest.mark.timeout(60)
def test_collector_refuses_a_port_past_65535_rather_than_feed_another_trainer(
    services: Services,
) -> None:
    """The same with `RemoteDataCollector` (docs/experience.md; examples/agent.py's
    `--trainer`): an experience-plane address of port P + 65536 is dialled as given, gRPC takes
    the port modulo 65536, and the samples are stored and acknowledged by the trainer on P,
    one nobody named. The trainer's own address flags refuse such a port at start."""
    address = services.start_experience_trainer(
        ONLINE, ["127.0.0.1:1"], "--metrics-listen", "127.0.0.1:0"
    )
    host, _, port = address.rpartition(":")
    wrong = f"{host}:{int(port) + 65536}"  # no such port: it wraps round to `port`
    try:
        collector = RemoteDataCollector(wrong, "experience", timeout_s=3)
    except (ConfigurationError, ValueError) as refused:
        assert "65535" in str(refused) or "port" in str(refused)
        return
    try:
        for _ in range(64):
            collector.collect({"x": torch.zeros(1), "y": torch.zeros(1)})
        collector.flush(timeout=10)
    finally:
        stats = collector.close(timeout=2)
    assert stats.acknowledged == 0, (
        f"RemoteDataCollector({wrong!r}) had {stats.acknowledged} samples acknowledged by the "
        f"trainer on {address}: the port was taken modulo 65536 instead of refused"
    )


@pytest.mark.timeout(60)
def test_example_client_reports_an_unreachable_service_as_its_loop_does() -> None:
    """README ("Deploy with docker compose") runs `examples/client.py --address
    127.0.0.1:$port --model sine` right after `docker compose up`. Its loop prints a failed
    request as `request failed: CODE: message` and goes on, but its first call (ModelMetadata)
    is outside that handling: a replica not up yet, a wrong port or a model the deployment does
    not serve ends the example with a Python traceback of grpc internals."""
    port = free_port()  # a loopback port nothing listens on
    done = subprocess.run(
        [sys.executable, "examples/client.py", "--address", f"127.0.0.1:{port}", "--seconds", "1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=40,
    )
    output = done.stdout + done.stderr
    assert "UNAVAILABLE" in output, output
    assert "Traceback" not in output, f"examples/client.py crashed:\n{output[-1500:]}"


@pytest.mark.parametrize(
    ("example", "flag"),
    [("client.py", "--address"), ("agent.py", "--inference"), ("agent.py", "--trainer")],
)
def test_the_examples_refuse_an_address_that_cannot_be_one_as_a_usage_error(
    example: str, flag: str
) -> None:
    """`port=$(docker compose port ...)` is empty when the replica is not up: the README's
    client then gets `--address 127.0.0.1:`. It is a usage error naming the flag (exit 2), not
    a traceback of the address check."""
    done = subprocess.run(
        [sys.executable, f"examples/{example}", flag, "127.0.0.1:", "--seconds", "1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert f"{flag}: '127.0.0.1:'" in done.stderr and "Traceback" not in done.stderr, done.stderr
