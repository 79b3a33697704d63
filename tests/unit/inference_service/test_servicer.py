"""The OIP servicer in process: ModelInfer answers serialized once, ModelStreamInfer answers in
request order with failures in-band (the integration tests drive both over gRPC)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import torch
from torch import nn

from inference_service.dataplane.batcher import BatchingConfig
from inference_service.dataplane.service import DataPlane
from inference_service.dataplane.servicer import FINAL, FINAL_ASKED, InferenceServicer
from inference_service.served_model import ServedModel
from shared.app import ModelSpec, TensorSpec
from shared.gen.inference import grpc_service_pb2 as pb

SPEC = ModelSpec(
    "double",
    lambda: None,  # type: ignore[arg-type,return-value]
    (TensorSpec("x", "FP32", (-1, 2)),),
    (TensorSpec("y", "FP32", (-1, 2)),),
)


class Double(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2


class Context:
    """What the servicer asks of a call's context on these paths."""

    def time_remaining(self) -> float | None:
        return None


def servicer() -> tuple[InferenceServicer, DataPlane]:
    model = ServedModel(SPEC, Double(), lambda m, x: m(x), True, torch.device("cpu"))
    data = DataPlane({"double": model}, BatchingConfig(max_batch_size=8), workers=1)
    data.set_ready(True)
    return InferenceServicer(data, "test"), data


def request(rows: np.ndarray, id: str, raw: bool = True) -> pb.ModelInferRequest:  # type: ignore[type-arg]
    message = pb.ModelInferRequest(model_name="double", id=id)
    tensor = message.inputs.add(name="x", datatype="FP32", shape=list(rows.shape))
    if raw:
        message.raw_input_contents.append(rows.astype("<f4").tobytes())
    else:
        tensor.contents.fp32_contents.extend(rows.reshape(-1).tolist())
    return message


def values(response: pb.ModelInferResponse) -> list[list[float]]:
    shape = list(response.outputs[0].shape)
    if response.raw_output_contents:
        array = np.frombuffer(response.raw_output_contents[0], "<f4")
    else:
        array = np.array(response.outputs[0].contents.fp32_contents, np.float32)
    return array.reshape(shape).tolist()  # type: ignore[no-any-return]


def test_model_infer_answers_with_its_response_serialized() -> None:
    service, data = servicer()
    rows = np.arange(4, dtype=np.float32).reshape(2, 2)

    async def ask(raw: bool) -> Any:
        return await service.ModelInfer(request(rows, "r", raw), Context())  # type: ignore[arg-type]

    try:
        for raw in (True, False):
            answer = asyncio.run(ask(raw))
            assert isinstance(answer, bytes)
            response = pb.ModelInferResponse.FromString(answer)
            assert (response.model_name, response.id) == ("double", "r")
            assert values(response) == (rows * 2).tolist()
    finally:
        data.close()


def test_a_stream_answers_in_request_order_and_a_failed_request_in_band() -> None:
    service, data = servicer()
    final = pb.ModelInferRequest(model_name="double", id="last")
    final.inputs.add(name="x", datatype="FP32", shape=[1, 2]).contents.fp32_contents.extend([5, 6])
    final.parameters[FINAL_ASKED].bool_param = True
    unknown = pb.ModelInferRequest(model_name="nothing", id="lost")
    as_text = request(np.ones((1, 2), np.float32), "text")  # Triton refuses it too
    as_text.parameters[FINAL_ASKED].string_param = "true"
    requests = [
        request(np.ones((1, 2), np.float32), "a"),
        unknown,
        request(np.full((3, 2), 2.0, np.float32), "b", raw=False),
        as_text,
        final,
    ]

    async def stream() -> list[pb.ModelStreamInferResponse]:
        async def each() -> AsyncIterator[pb.ModelInferRequest]:
            for r in requests:
                yield r

        answers = service.ModelStreamInfer(each(), Context())  # type: ignore[arg-type]
        return [a async for a in answers]

    try:
        answers = asyncio.run(stream())
    finally:
        data.close()
    assert [a.infer_response.id for a in answers] == ["a", "lost", "b", "text", "last"]
    assert [bool(a.error_message) for a in answers] == [False, True, False, True, False]
    assert "nothing" in answers[1].error_message
    assert "must be a bool_param, not string_param" in answers[3].error_message
    assert values(answers[0].infer_response) == [[2.0, 2.0]]
    assert values(answers[2].infer_response) == [[4.0, 4.0]] * 3
    assert values(answers[4].infer_response) == [[10.0, 12.0]]
    assert answers[4].infer_response.parameters[FINAL].bool_param
    assert FINAL not in answers[0].infer_response.parameters
