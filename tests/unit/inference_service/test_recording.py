"""How a served model's requests fill a buffer (inference_service/recording.py): which tensors go
where, and the refusals a request or an app gets."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from inference_service.recording import DROPPED, Plan, Recorder, plan
from shared.app import App, TensorSpec
from shared.data import DictSequentialBuffer
from shared.errors import (
    BufferNotFoundError,
    ConfigurationError,
    InvalidArgumentError,
    UnsupportedError,
)
from shared.gen.inference import grpc_service_pb2 as pb
from shared.torch import TorchTrainingModel

X = TensorSpec("x", "FP32", (-1, 2))
Y = TensorSpec("y", "FP32", (-1, 1))


def app(record: str | None = None, **buffers: list[TensorSpec]) -> App:
    made = App()
    made.add_model(
        "m", lambda: TorchTrainingModel(nn.Linear(2, 1)), inputs=[X], outputs=[Y], record=record
    )
    for name, tensors in buffers.items():
        made.add_buffer(
            name,
            lambda tensors=tensors: DictSequentialBuffer([t.name for t in tensors], 10),
            tensors=tensors,
        )
    return made


def parameters(**values: str | int) -> dict[str, pb.InferParameter]:
    found = {}
    for key, value in values.items():
        found[key] = (
            pb.InferParameter(string_param=value)
            if isinstance(value, str)
            else pb.InferParameter(int64_param=value)
        )
    return found


def test_a_batched_model_gives_a_sample_per_row_from_its_inputs_and_outputs() -> None:
    made = app(steps=[TensorSpec("y", "FP32", (1,)), TensorSpec("x", "FP32", (2,))])
    found = plan(made.models["m"], made.buffers["steps"])
    assert found == Plan("m", "steps", (("y", True, 0), ("x", False, 0)), rows=True)


@pytest.mark.parametrize(
    ("tensors", "message"),
    [
        ([TensorSpec("z", "FP32", (1,))], "the buffer's samples hold 'z', which the model"),
        (
            [TensorSpec("x", "FP64", (2,))],
            "tensor 'x' is FP32[2] per row but the buffer collects FP64[2]",
        ),
        ([TensorSpec("x", "FP32", (3,))], "tensor 'x' is FP32[2] per row but the buffer collects"),
    ],
)
def test_a_buffer_the_model_cannot_fill_is_refused(tensors: list[TensorSpec], message: str) -> None:
    made = app(steps=tensors)
    with pytest.raises(InvalidArgumentError, match=re.escape(message)):
        plan(made.models["m"], made.buffers["steps"])
    with pytest.raises(ConfigurationError, match=re.escape(message)):  # declared in the app
        Recorder(app("steps", steps=tensors).models, made.buffers, ["127.0.0.1:1"])


def test_a_model_recording_into_an_undeclared_buffer_is_a_configuration_error() -> None:
    made = app("nowhere")
    with pytest.raises(ConfigurationError, match="records into buffer 'nowhere', which the app"):
        Recorder(made.models, made.buffers, ["127.0.0.1:1"])


def test_requests_name_a_declared_buffer_with_a_string() -> None:
    made = app(steps=[TensorSpec("x", "FP32", (2,))])
    recorder = Recorder(made.models, made.buffers, ["127.0.0.1:1"])
    try:
        assert recorder.plans("m", {}) == ()
        (asked,) = recorder.plans("m", parameters(record="steps"))
        assert asked.buffer == "steps"
        with pytest.raises(BufferNotFoundError, match="declares no buffer 'other'"):
            recorder.plans("m", parameters(record="other"))
        with pytest.raises(InvalidArgumentError, match="give a string"):
            recorder.plans("m", parameters(record=3))
    finally:
        recorder.close(0)


def test_without_trainers_recording_is_off_and_requests_for_it_refused() -> None:
    made = app("steps", steps=[TensorSpec("x", "FP32", (2,))])
    recorder = Recorder(made.models, made.buffers, None)
    assert recorder.plans("m", {}) == ()  # the model's own recording: off, with a warning
    with pytest.raises(UnsupportedError, match="records no requests"):
        recorder.plans("m", parameters(record="steps"))
    recorder.record((), [torch.zeros(1, 2)], [torch.zeros(1, 1)])  # nothing to do


def test_with_record_asked_off_only_what_the_models_declare_is_recorded() -> None:
    """An operator who does not let data-plane clients add samples to a trainer's buffers
    turns requests' own recording off; the models' declared recording goes on."""
    made = app(
        "steps", steps=[TensorSpec("x", "FP32", (2,))], other=[TensorSpec("y", "FP32", (1,))]
    )
    recorder = Recorder(made.models, made.buffers, ["127.0.0.1:1"], record_asked=False)
    try:
        (steps,) = recorder.plans("m", {})
        assert steps.buffer == "steps"
        with pytest.raises(UnsupportedError, match=r"records only what its models declare"):
            recorder.plans("m", parameters(record="other"))
    finally:
        recorder.close(0)


def test_a_request_beyond_the_queues_bytes_is_dropped_and_counted() -> None:
    made = app("steps", steps=[TensorSpec("x", "FP32", (2,)), TensorSpec("y", "FP32", (1,))])
    recorder = Recorder(made.models, made.buffers, ["127.0.0.1:1"], max_queue_bytes=1000)
    try:
        (steps,) = recorder.plans("m", {})
        before = DROPPED.labels("steps", "queue")._value.get()
        # 100 rows: 800 bytes of inputs and 400 of outputs, past 1000 bytes whatever is queued
        recorder.record((steps,), [torch.zeros(100, 2)], [torch.zeros(100, 1)])
        assert DROPPED.labels("steps", "queue")._value.get() - before == 100
    finally:
        recorder.close(0)
