"""The client decodes responses with the server's own routines: every datatype, both forms."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from inference_service.client import decode_outputs
from shared.app import TensorSpec
from shared.dtypes import BY_OIP, BYTES
from shared.errors import InvalidInputError
from shared.gen.inference import grpc_service_pb2 as pb
from tests.unit.inference_service.values import bitwise_equal, encode_outputs, extremes

WORDS = np.array([[b"", b"abc", "\u00e9".encode(), bytes(range(256))]], dtype=object)


def response_for(
    datatype: str, value: torch.Tensor | np.ndarray, raw: bool
) -> pb.ModelInferResponse:
    """The server's response carrying `value` as output "y" (typed where the datatype can be)."""
    spec = TensorSpec("y", datatype, (-1, value.shape[1]))
    outputs, contents = encode_outputs([value], [spec], [], raw)
    return pb.ModelInferResponse(outputs=outputs, raw_output_contents=contents)


@pytest.mark.parametrize("raw", [True, False], ids=["raw", "typed"])
@pytest.mark.parametrize("datatype", list(BY_OIP))
def test_every_datatype_round_trips_through_the_clients_decode(datatype: str, raw: bool) -> None:
    if datatype == BYTES:
        (decoded,) = decode_outputs(response_for(datatype, WORDS, raw)).values()
        assert isinstance(decoded, np.ndarray) and decoded.shape == WORDS.shape
        assert decoded.tolist() == WORDS.tolist()
        return
    value = extremes(datatype)
    response = response_for(datatype, value, raw)
    # FP16 and BF16 have no typed field: the server answers them raw whatever was asked.
    assert bool(response.raw_output_contents) == (raw or BY_OIP[datatype].field is None)
    (decoded,) = decode_outputs(response).values()
    assert isinstance(decoded, torch.Tensor) and bitwise_equal(decoded, value)


def test_a_malformed_typed_response_is_refused_naming_the_output() -> None:
    response = response_for("UINT8", torch.tensor([[0, 255]], dtype=torch.uint8), raw=False)
    response.outputs[0].contents.uint_contents[1] = 256
    with pytest.raises(InvalidInputError, match=r"output 'y': values must lie in \[0, 255\]"):
        decode_outputs(response)
    response.outputs[0].contents.uint_contents.append(1)
    with pytest.raises(InvalidInputError, match=r"output 'y': 3 values but shape \[1, 2\]"):
        decode_outputs(response)
    response.outputs[0].contents.int_contents.append(1)
    with pytest.raises(InvalidInputError, match="UINT8 values belong in uint_contents, not int"):
        decode_outputs(response)
    half = response_for("FP16", torch.ones(1, 2, dtype=torch.float16), raw=True)
    half.outputs[0].contents.fp32_contents.extend([1.0, 1.0])
    del half.raw_output_contents[:]
    with pytest.raises(InvalidInputError, match="FP16 can only be sent in raw_output_contents"):
        decode_outputs(half)
