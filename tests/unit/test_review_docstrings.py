"""Review: code defects found while checking the product's docstrings against its code.

shared/grpc/address.py says every address a user names, an agent's collector's among them, is
checked before gRPC sees it, and Recorder's docstring says what no call could use is refused
"now, not at the first request recorded". The inference service's `--experience` addresses are
the one list that escapes both: the setting takes any `HOST:PORT`-looking text (port 0, a
scheme, an unbracketed IPv6 address), the Recorder is built without complaint, and every
recorded request then fails inside the recording thread (the RemoteDataCollector's own address
check raises ValueError there), logged with a traceback per request and counted nowhere:
neither as recorded nor as dropped.
"""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from inference_service.recording import DROPPED, RECORDED, Recorder
from inference_service.settings import InferenceSettings
from shared.app import App, TensorSpec
from shared.data import DictSequentialBuffer
from shared.errors import ConfigurationError
from shared.torch import TorchTrainingModel

X = TensorSpec("x", "FP32", (-1, 2))
Y = TensorSpec("y", "FP32", (-1, 1))

# Addresses that shared/grpc/address.checked_address (and so every RemoteDataCollector) refuses.
UNDIALLABLE = ["127.0.0.1:0", "http://trainer:8201", "::1:8201"]


def recording_app() -> App:
    made = App()
    made.add_model(
        "m", lambda: TorchTrainingModel(nn.Linear(2, 1)), inputs=[X], outputs=[Y], record="steps"
    )
    made.add_buffer(
        "steps",
        lambda: DictSequentialBuffer(["x", "y"], 10),
        tensors=[TensorSpec("x", "FP32", (2,)), TensorSpec("y", "FP32", (1,))],
    )
    return made


@pytest.mark.parametrize("address", UNDIALLABLE)
def test_the_experience_setting_refuses_an_address_no_collector_can_dial(address: str) -> None:
    with pytest.raises(SystemExit):
        InferenceSettings.from_args(["--models", "x:y", "--experience", address], {})


@pytest.mark.parametrize("address", UNDIALLABLE)
def test_a_recorder_refuses_an_experience_address_at_start(address: str) -> None:
    made = recording_app()
    with pytest.raises((ConfigurationError, ValueError)):
        recorder = Recorder(made.models, made.buffers, [address])
        recorder.close(timeout=1.0)


def test_a_request_whose_collector_cannot_be_made_is_at_least_counted_dropped(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    made = recording_app()

    def unusable(*args: object, **kwargs: object) -> None:
        raise RuntimeError("no collector today")

    monkeypatch.setattr("inference_service.recording.RemoteDataCollector", unusable)
    recorder = Recorder(made.models, made.buffers, ["127.0.0.1:1"])
    dropped = sum(
        DROPPED.labels("steps", cause)._value.get() for cause in ("queue", "trainer", "shape")
    )
    recorded = RECORDED.labels("steps")._value.get()
    plans = recorder.plans("m", {})
    with caplog.at_level(logging.ERROR, logger="inference_service.recording"):
        recorder.record(plans, [torch.ones(3, 2)], [torch.ones(3, 1)])
        recorder.close(timeout=5.0)
    now_dropped = sum(
        DROPPED.labels("steps", cause)._value.get() for cause in ("queue", "trainer", "shape")
    )
    now_recorded = RECORDED.labels("steps")._value.get()
    # Three samples went in; each must show up as recorded or as dropped.
    assert (now_dropped - dropped) + (now_recorded - recorded) == 3, (
        "the samples were counted nowhere; the log says: "
        + " | ".join(
            r.getMessage() + (f" ({r.exc_info[1]})" if r.exc_info else "") for r in caplog.records
        )
    )
