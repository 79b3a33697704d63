"""The pieces behind the outside review of the data plane (tests/integration/
test_review_stream.py): which requested outputs are refused before a model runs, a place in
admission held by two holders, and a recorded request whose sizes do not fit its buffer."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from inference_service.dataplane.admission import Admission, RequestLimits
from inference_service.dataplane.outputs import requested_outputs
from inference_service.recording import plan
from shared.app import App, TensorSpec
from shared.data import DictSequentialBuffer
from shared.errors import InvalidInputError, ResourceLimitError, UnsupportedError
from shared.gen.inference import grpc_service_pb2 as pb
from shared.torch import TorchTrainingModel

SPECS = [TensorSpec("a", "FP32", (-1,)), TensorSpec("b", "FP32", (-1,))]
Asked = pb.ModelInferRequest.InferRequestedOutputTensor


def asked(*names: str) -> list[Asked]:
    return [Asked(name=name) for name in names]


def test_requested_outputs_are_named_once_each_and_known() -> None:
    assert requested_outputs([], SPECS) == []
    assert requested_outputs(asked("b", "a"), SPECS) == ["b", "a"]
    with pytest.raises(InvalidInputError, match="unknown output 'c'; the model returns a, b"):
        requested_outputs(asked("a", "c"), SPECS)
    with pytest.raises(InvalidInputError, match="output 'a' is requested twice"):
        requested_outputs(asked("a", "b", "a"), SPECS)


@pytest.mark.parametrize(
    ("value", "refused"),
    [
        (pb.InferParameter(int64_param=3), True),
        (pb.InferParameter(int64_param=0), False),
        (pb.InferParameter(string_param="0"), True),
        (pb.InferParameter(), True),
    ],
)
def test_an_output_asked_for_as_classes_is_unsupported(
    value: pb.InferParameter, refused: bool
) -> None:
    output = Asked(name="a")
    output.parameters["classification"].CopyFrom(value)
    if refused:
        with pytest.raises(UnsupportedError, match="classification extension is not supported"):
            requested_outputs([output], SPECS)
    else:
        assert requested_outputs([output], SPECS) == ["a"]


def test_a_place_held_twice_is_free_once_both_holders_released_it() -> None:
    admission = Admission(RequestLimits(max_requests_per_model=1, max_bytes=100))
    ticket = admission.admit("m", 10, holders=2)
    ticket.release()  # the model ran; the answer still waits
    assert admission.in_flight("m") == 1 and admission.bytes_in_flight == 10
    ticket.release()
    assert admission.in_flight("m") == 0 and admission.bytes_in_flight == 0
    ticket.release()  # once per holder: one more changes nothing
    assert admission.in_flight("m") == 0 and admission.bytes_in_flight == 0
    admission.admit("m", 10)


def test_an_answer_waiting_counts_its_bytes_where_they_are_more_than_its_tensors() -> None:
    admission = Admission(RequestLimits(max_requests_per_model=4, max_bytes=100))
    ticket = admission.admit("m", 10, holders=2)
    admission.grow(ticket, 5)  # less than the tensors: they stay counted
    assert admission.bytes_in_flight == 10
    admission.grow(ticket, 90)
    assert admission.bytes_in_flight == 90
    with pytest.raises(ResourceLimitError, match="requests in flight hold 90 bytes"):
        admission.admit("m", 20)
    ticket.release()
    ticket.release()
    assert admission.bytes_in_flight == 0 and admission.in_flight("m") == 0
    admission.grow(ticket, 50)  # released: nothing to count
    assert admission.bytes_in_flight == 0


def test_a_recorded_request_must_have_the_sizes_the_buffer_fixes() -> None:
    made = App()
    made.add_model(
        "m",
        lambda: TorchTrainingModel(nn.Identity()),
        inputs=[TensorSpec("x", "FP32", (-1, -1))],
        outputs=[TensorSpec("y", "FP32", (-1, -1))],
    )
    made.add_buffer(
        "pairs",
        lambda: DictSequentialBuffer(["x"], 10),
        tensors=[TensorSpec("x", "FP32", (2,))],
    )
    found = plan(made.models["m"], made.buffers["pairs"])
    fits = found.tensors([torch.zeros(3, 2)], [torch.zeros(3, 2)])
    assert found.misfit(fits) is None and fits.samples == 3
    wide = found.tensors([torch.zeros(1, 3)], [torch.zeros(1, 3)])
    assert found.misfit(wide) == "tensor 'x' is [3] per row but buffer 'pairs' holds [2]"
