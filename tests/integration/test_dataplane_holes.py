"""The data plane's holes, over gRPC with raw OIP requests against a real service: what may be
batched together, which version answers a request that names one, how large a shape may be,
and how much the service holds for requests in flight."""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

from shared.gen.inference import grpc_service_pb2 as oip
from shared.gen.inference import grpc_service_pb2_grpc as oip_grpc
from tests.integration.apps import Stamp
from tests.integration.conftest import Inference, Services, wait_until
from trainer_service.publisher import Publisher

HOLES = "tests.integration.apps:holes"
STAMP = "tests.integration.apps:stamp"
UNBATCHED = ("--max-batch-size", "1")
HUGE = 2**63 - 1
RNG = np.random.default_rng(7)


class Gate:
    """While shut, every model of the holes app waits in its forward pass (apps.hold_at_gate)."""

    def __init__(self, services: Services, tmp: Path) -> None:
        self.path = tmp / "gate"
        services.env["TEST_GATE"] = str(self.path)

    def shut(self) -> None:
        self.path.touch()

    def wait_held(self) -> None:
        """Until a request waits at the gate, inside its model."""
        wait_until(Path(f"{self.path}.held").exists, timeout=30)

    def open(self) -> None:
        self.path.unlink()


@pytest.fixture
def gate(services: Services, tmp_path: Path) -> Iterator[Gate]:
    gate = Gate(services, tmp_path)
    yield gate
    gate.path.unlink(missing_ok=True)  # never leave a model waiting for a test that failed


def stub(inference: Inference) -> oip_grpc.GRPCInferenceServiceStub:
    return oip_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(inference.data))


def request(model: str, version: str = "", **inputs: np.ndarray) -> oip.ModelInferRequest:  # type: ignore[type-arg]
    """A ModelInfer request with its inputs as raw contents."""
    message = oip.ModelInferRequest(model_name=model, model_version=version)
    for name, array in inputs.items():
        message.inputs.add(name=name, datatype="FP32", shape=array.shape)
        message.raw_input_contents.append(array.astype("<f4").tobytes())
    return message


def output(response: oip.ModelInferResponse, index: int = 0) -> np.ndarray:  # type: ignore[type-arg]
    shape = list(response.outputs[index].shape)
    return np.frombuffer(response.raw_output_contents[index], "<f4").reshape(shape)


def rows(count: int, width: int) -> np.ndarray:  # type: ignore[type-arg]
    return RNG.standard_normal((count, width)).astype(np.float32)


def in_flight(inference: Inference, model: str) -> int:
    """The service's gauge of `model`'s requests admitted and not yet run."""
    return int(inference.metric(f'weightsync_inference_requests_in_flight{{model="{model}"}}'))


def failure(call: grpc.Future) -> grpc.RpcError:
    """The error a call ended with (it must have failed)."""
    error = call.exception(timeout=30)
    assert isinstance(error, grpc.RpcError), f"the call succeeded: {call.result()}"
    return error


# Row 8: requests whose sizes beyond the batch dimension differ were joined into one batch,
# which failed for all of them with INTERNAL ("Sizes of tensors must match").
def test_requests_batch_only_with_requests_of_the_same_sizes_beyond_the_batch_dimension(
    services: Services, gate: Gate
) -> None:
    inference = services.inference(HOLES)
    data = stub(inference)
    gate.shut()
    first_x = rows(1, 3)
    first = data.ModelInfer.future(request("ragged", x=first_x), timeout=30)
    gate.wait_held()  # the model runs `first`; the next requests queue together behind it
    xs = [rows(1, 3), rows(1, 5), rows(2, 3)]
    calls = [data.ModelInfer.future(request("ragged", x=x), timeout=30) for x in xs]
    wait_until(lambda: in_flight(inference, "ragged") == 4, timeout=30)
    gate.open()
    for call, x in zip([first, *calls], [first_x, *xs], strict=True):
        assert output(call.result(timeout=30)).tobytes() == x.tobytes()  # its own rows, exactly
    # The two requests 3 wide ran as one batch of 3 rows; the one 5 wide ran alone.
    (stats,) = data.ModelStatistics(
        oip.ModelStatisticsRequest(name="ragged"), timeout=10
    ).model_stats
    assert {b.batch_size: b.compute_infer.count for b in stats.batch_stats} == {1: 2, 3: 1}
    assert "INTERNAL" not in inference.log.read_text()


# Row 9: a request with 1 row of `x` and 0 of `y` was batched with one that had 1 of each, and
# got the other request's `y` back.
@pytest.mark.parametrize("extra", [(), UNBATCHED], ids=["batched", "unbatched"])
def test_every_input_of_a_request_must_have_the_same_number_of_rows(
    services: Services, gate: Gate, extra: tuple[str, ...]
) -> None:
    inference = services.inference(HOLES, *extra)
    data = stub(inference)
    gate.shut()
    held = data.ModelInfer.future(request("two", x=rows(1, 2), y=rows(1, 2)), timeout=30)
    gate.wait_held()
    uneven = data.ModelInfer.future(request("two", x=rows(1, 2), y=rows(0, 2)), timeout=30)
    b_x, b_y = rows(1, 2), rows(1, 2)
    even = data.ModelInfer.future(request("two", x=b_x, y=b_y), timeout=30)
    # Both queued behind `held` (with the hole), or the uneven one refused and the other queued.
    wait_until(
        lambda: (
            in_flight(inference, "two") == 3 or (uneven.done() and in_flight(inference, "two") == 2)
        ),
        timeout=30,
    )
    gate.open()
    error = failure(uneven)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "different numbers of rows (first dimension: 'x' 1, 'y' 0)" in error.details()
    assert "every input of a request must have the same number of rows" in error.details()
    response = even.result(timeout=30)
    assert output(response, 0).tobytes() == b_x.tobytes()
    assert output(response, 1).tobytes() == b_y.tobytes()
    held.result(timeout=30)


def stamp_state(value: float) -> dict[str, torch.Tensor]:
    return {k: torch.full_like(v, value) for k, v in Stamp(1).state_dict().items()}


# Row 10: a request naming the version ModelMetadata had just reported was checked against the
# live version on arrival and ran on whatever was live later: 88 of 759 answers while pushes
# streamed in came from another version than the one named.
@pytest.mark.parametrize("extra", [(), UNBATCHED], ids=["batched", "unbatched"])
def test_a_request_naming_a_version_runs_on_that_version_or_fails_naming_the_served_one(
    services: Services, extra: tuple[str, ...]
) -> None:
    services.env["TEST_STAMP_MB"] = "1"
    inference = services.inference(STAMP, *extra)
    data = stub(inference)
    publisher = Publisher([inference.sync], "holes")
    versions = 40

    def push() -> None:
        for version in range(1, versions + 1):  # version n's weights are all n
            assert publisher.publish("stamp", stamp_state(float(version))).version == version

    answers: list[tuple[int, oip.ModelInferResponse | grpc.RpcError]] = []

    def ask(pushing: threading.Thread) -> None:
        x = np.zeros((1, 8), np.float32)
        while pushing.is_alive():
            meta = data.ModelMetadata(oip.ModelMetadataRequest(name="stamp"), timeout=10)
            named = int(meta.versions[0])
            try:
                answer = data.ModelInfer(request("stamp", str(named), x=x), timeout=10)
            except grpc.RpcError as error:
                answers.append((named, error))
            else:
                answers.append((named, answer))

    pushing = threading.Thread(target=push)
    askers = [threading.Thread(target=ask, args=(pushing,)) for _ in range(4)]
    pushing.start()
    for asker in askers:
        asker.start()
    pushing.join()
    for asker in askers:
        asker.join()
    publisher.close()
    answered = [(named, a) for named, a in answers if isinstance(a, oip.ModelInferResponse)]
    refused = [(named, a) for named, a in answers if isinstance(a, grpc.RpcError)]
    assert answered
    for named, response in answered:  # ran on the version named, and only on it
        assert response.model_version == str(named)
        assert output(response).tolist() == [[float(named)] * 8]
    for named, error in refused:  # a push replaced it between the metadata and the request
        assert error.code() == grpc.StatusCode.NOT_FOUND, error.details()
        served = re.search(rf"version {named} is not served; version (\d+) is", error.details())
        assert served is not None, error.details()
        assert int(served.group(1)) > named
    assert inference.model_state("stamp").version == versions


# Row 14: a shape of [0, 2**63 - 1, 2**63 - 1] with empty contents reached torch, which
# answered INTERNAL ("Stride calculation overflowed").
def test_shapes_too_large_for_a_request_are_refused_before_any_tensor_is_built(
    services: Services,
) -> None:
    inference = services.inference(HOLES)
    data = stub(inference)
    shapes = [[0, HUGE, HUGE], [HUGE, 0, 1], [0, 1 << 40, 1 << 40]]
    cases = []
    for shape in shapes:
        for model, datatype in (("cube", "FP32"), ("cube_text", "BYTES")):
            typed = oip.ModelInferRequest(model_name=model)
            typed.inputs.add(name="x", datatype=datatype, shape=shape)
            raw = oip.ModelInferRequest()
            raw.CopyFrom(typed)
            raw.raw_input_contents.append(b"")
            cases += [(shape, raw), (shape, typed)]
    for shape, message in cases:
        with pytest.raises(grpc.RpcError) as caught:
            data.ModelInfer(message, timeout=10)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
        assert f"input 'x': shape {shape} is too large" in caught.value.details()
    fine = rows(4, 6).reshape(2, 3, 4)
    assert output(data.ModelInfer(request("cube", x=fine), timeout=10)).tobytes() == fine.tobytes()
    assert "unhandled" not in inference.log.read_text()


# Found by reading the code: nothing bounded the requests an unbatched model had queued for a
# worker, nor the bytes of tensors requests in flight held.
def test_requests_in_flight_are_bounded_per_model_and_their_bytes_per_service(
    services: Services, gate: Gate
) -> None:
    budget = 1 << 16
    inference = services.inference(
        HOLES, "--max-requests-in-flight", "2", "--max-request-bytes-in-flight", str(budget)
    )
    data = stub(inference)
    gate.shut()
    held: list[tuple[grpc.Future, np.ndarray]] = []  # type: ignore[type-arg]
    for model in ("ragged", "fixed"):  # batched, and never batched
        for _ in range(2):  # held at the gate (a batched model's second one queued behind)
            x = rows(1, 4)
            held.append((data.ModelInfer.future(request(model, x=x), timeout=30), x))
        wait_until(lambda model=model: in_flight(inference, model) == 2, timeout=30)
        with pytest.raises(grpc.RpcError) as caught:
            data.ModelInfer(request(model, x=rows(1, 4)), timeout=10)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert f"model {model!r}: 2 requests are in flight" in caught.value.details()
        assert "--max-requests-in-flight 2" in caught.value.details()
    # Four requests of 16 bytes each hold 64 of the service's 65,536.
    filling = rows(1, budget // 4).reshape(1, 128, 128)  # 65,536 bytes: over by the 64 held
    with pytest.raises(grpc.RpcError) as caught:
        data.ModelInfer(request("cube", x=filling), timeout=10)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "requests in flight hold 64 bytes of tensors; this one's 65536" in caught.value.details()
    too_large = rows(1, budget // 4 + 128).reshape(1, 129, 128)
    with pytest.raises(grpc.RpcError) as caught:
        data.ModelInfer(request("cube", x=too_large), timeout=10)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "more than all requests in flight may hold together" in caught.value.details()
    gate.open()
    for call, x in held:
        assert output(call.result(timeout=30)).tobytes() == x.tobytes()
    wait_until(lambda: in_flight(inference, "ragged") == in_flight(inference, "fixed") == 0)
    answer = data.ModelInfer(request("cube", x=filling), timeout=10)  # all given back
    assert output(answer).tobytes() == filling.tobytes()
