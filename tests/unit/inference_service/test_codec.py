"""The codec: OIP tensors to what a model takes and back, every datatype, both forms, every
refusal."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import tritonclient.grpc as triton

from inference_service.dataplane.bytes_wire import pack_bytes, unpack_bytes
from inference_service.dataplane.codec import decode_inputs
from inference_service.dataplane.model_io import Tensor, normalize_model_outputs, to_model
from shared.app import TensorSpec
from shared.dtypes import BY_OIP, datatype_of, dtype_of
from shared.errors import InvalidInputError
from shared.gen.inference import grpc_service_pb2 as pb
from tests.unit.inference_service.values import bitwise_equal, encode_outputs, extremes


def model_inputs(
    request: pb.ModelInferRequest, specs: list[TensorSpec], max_message_bytes: int | None = None
) -> list[Tensor]:
    """The request's inputs as its model takes them: decoded, then made tensors (as the model's
    thread does)."""
    limit = {} if max_message_bytes is None else {"max_message_bytes": max_message_bytes}
    decoded = decode_inputs(request, specs, **limit)
    return [to_model(t, torch.device("cpu")) for t in decoded]  # type: ignore[misc]


def request_for(tensor: torch.Tensor, datatype: str, raw: bool) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="m")
    entry = request.inputs.add(name="x", datatype=datatype, shape=list(tensor.shape))
    if raw:
        request.raw_input_contents.append(tensor.contiguous().view(torch.uint8).numpy().tobytes())
    else:
        field = BY_OIP[datatype].field
        assert field is not None
        getattr(entry.contents, field.name).extend(tensor.reshape(-1).tolist())
    return request


TORCH_TYPED = [d for d, e in BY_OIP.items() if e.torch_dtype is not None]
FORMS = [(d, True) for d in TORCH_TYPED] + [(d, False) for d in TORCH_TYPED if BY_OIP[d].field]


@pytest.mark.parametrize(("datatype", "raw"), FORMS)
def test_every_datatype_round_trips(datatype: str, raw: bool) -> None:
    tensor = extremes(datatype)
    spec = TensorSpec("x", datatype, (-1, tensor.shape[1]))
    (decoded,) = model_inputs(request_for(tensor, datatype, raw), [spec])
    assert bitwise_equal(decoded, tensor)
    # back as the service sends a model's output: made a host array on the model's thread
    outputs, contents = encode_outputs(normalize_model_outputs(decoded, 1), [spec], [], raw)
    response = pb.ModelInferResponse(outputs=outputs, raw_output_contents=contents)
    assert datatype_of(decoded.dtype) == datatype
    if contents:
        back = torch.frombuffer(bytearray(contents[0]), dtype=tensor.dtype).reshape(tensor.shape)
    else:
        field = BY_OIP[datatype].field
        assert field is not None
        values = list(getattr(response.outputs[0].contents, field.name))
        back = torch.tensor(values, dtype=tensor.dtype).reshape(tensor.shape)
    assert bitwise_equal(back, tensor)


def test_half_precision_outputs_force_a_raw_response() -> None:
    specs = [TensorSpec("a", "FP32", (1,)), TensorSpec("b", "BF16", (1,))]
    outputs, contents = encode_outputs(
        [torch.ones(1), torch.ones(1, dtype=torch.bfloat16)], specs, [], raw=False
    )
    assert len(contents) == 2 and not outputs[0].contents.fp32_contents


def test_empty_and_scalar_tensors() -> None:
    spec = TensorSpec("x", "FP32", (-1, 3))
    (decoded,) = model_inputs(request_for(torch.empty(0, 3), "FP32", raw=True), [spec])
    assert decoded.shape == (0, 3)
    scalar_spec = TensorSpec("x", "INT64", ())
    (scalar,) = model_inputs(request_for(torch.tensor(5), "INT64", raw=False), [scalar_spec])
    assert scalar.shape == () and scalar.item() == 5


def test_a_raw_input_is_a_read_only_view_until_the_model_takes_it_in_memory_of_its_own() -> None:
    request = request_for(torch.ones(1, 3), "FP32", raw=True)
    (decoded,) = decode_inputs(request, [TensorSpec("x", "FP32", (-1, 3))])
    assert isinstance(decoded, np.ndarray) and not decoded.flags.writeable
    with pytest.raises(ValueError, match="read-only"):
        decoded += 1
    taken = to_model(decoded, torch.device("cpu"))
    assert isinstance(taken, torch.Tensor)
    taken.add_(1)
    assert request.raw_input_contents[0] == torch.ones(1, 3).numpy().tobytes()
    assert bitwise_equal(taken, torch.full((1, 3), 2.0))


SPECS = [TensorSpec("x", "FP32", (-1, 3)), TensorSpec("k", "INT8", (2,))]


def two_inputs(raw: bool = True) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="m")
    request.inputs.add(name="x", datatype="FP32", shape=[1, 3])
    request.inputs.add(name="k", datatype="INT8", shape=[2])
    if raw:
        request.raw_input_contents.extend([bytes(12), bytes(2)])
    else:
        request.inputs[0].contents.fp32_contents.extend([0.0] * 3)
        request.inputs[1].contents.int_contents.extend([1, 2])
    return request


def refused(request: pb.ModelInferRequest, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        decode_inputs(request, SPECS)


def test_both_forms_accepted() -> None:
    for raw in (True, False):
        x, k = model_inputs(two_inputs(raw), SPECS)
        assert x.shape == (1, 3) and k.tolist() == ([0, 0] if raw else [1, 2])


def test_refusals() -> None:
    r = two_inputs()
    r.inputs[0].name = "z"
    refused(r, r"unknown input 'z'; the model takes x, k")
    r = two_inputs()
    del r.inputs[1]
    del r.raw_input_contents[1]
    refused(r, r"missing input\(s\) k")
    r = two_inputs()
    r.inputs[1].name = "x"
    refused(r, "input 'x' is given twice")
    r = two_inputs()
    r.inputs[0].datatype = "FP64"
    refused(r, "input 'x': datatype 'FP64' but the model takes FP32")
    r = two_inputs()
    r.inputs[0].shape[:] = [1, 4]
    refused(r, r"shape \[1, 4\] does not fit the model's \[-1, 3\]")
    r = two_inputs()
    r.inputs[0].shape[:] = [3]
    refused(r, r"shape \[3\] does not fit")
    r = two_inputs()
    r.inputs[0].shape[:] = [-1, 3]
    refused(r, "negative size")
    r = two_inputs()
    r.raw_input_contents[0] = bytes(11)
    refused(r, r"11 raw bytes but FP32\[1, 3\] needs 12")
    r = two_inputs()
    del r.raw_input_contents[1]
    refused(r, "1 raw_input_contents entries for 2 inputs")
    r = two_inputs()
    r.inputs[0].contents.fp32_contents.append(1.0)
    refused(r, "has typed contents while the request uses raw_input_contents")
    r = two_inputs(raw=False)
    r.inputs[0].contents.fp32_contents.append(1.0)
    refused(r, "4 values but shape")
    r = two_inputs(raw=False)
    r.inputs[1].contents.int_contents[:] = [1, 300]
    refused(r, r"values must lie in \[-128, 127\] for INT8")
    r = two_inputs(raw=False)
    r.inputs[0].contents.fp64_contents.extend([0.0] * 3)
    refused(r, "FP32 values belong in fp32_contents, not fp64_contents")
    r = pb.ModelInferRequest()
    r.inputs.add(name="h", datatype="FP16", shape=[1]).contents.fp32_contents.append(1)
    with pytest.raises(InvalidInputError, match="FP16 can only be sent in raw_input_contents"):
        decode_inputs(r, [TensorSpec("h", "FP16", (1,))])
    with pytest.raises(InvalidInputError, match="datatype 'STRING' is not supported"):
        dtype_of("STRING")
    r = pb.ModelInferRequest()  # a bool is one byte, 0 or 1: numpy and torch misread others
    r.inputs.add(name="b", datatype="BOOL", shape=[3])
    r.raw_input_contents.append(bytes([0, 1, 2]))
    with pytest.raises(InvalidInputError, match="BOOL raw bytes must each be 0 or 1"):
        decode_inputs(r, [TensorSpec("b", "BOOL", (3,))])
    r.raw_input_contents[0] = bytes([0, 1, 1])
    (decoded,) = decode_inputs(r, [TensorSpec("b", "BOOL", (3,))])
    assert decoded.tolist() == [False, True, True]


def test_bytes_round_trip_raw_and_typed() -> None:
    words = [b"", b"abc", "\u00e9".encode(), bytes(range(256))]
    spec = [TensorSpec("t", "BYTES", (2, -1))]
    for raw in (True, False):
        r = pb.ModelInferRequest()
        tensor = r.inputs.add(name="t", datatype="BYTES", shape=[2, 2])
        if raw:
            r.raw_input_contents.append(pack_bytes(words))
        else:
            tensor.contents.bytes_contents.extend(words)
        (decoded,) = model_inputs(r, spec)
        assert isinstance(decoded, np.ndarray) and decoded.shape == (2, 2)
        assert decoded.reshape(-1).tolist() == words
        outputs, contents = encode_outputs([decoded], spec, [], raw=raw)
        assert list(outputs[0].shape) == [2, 2]
        if raw:
            assert unpack_bytes("output 't'", contents[0], 4) == words
        else:
            assert list(outputs[0].contents.bytes_contents) == words


def test_bytes_outputs_take_str_and_refuse_other_values() -> None:
    spec = [TensorSpec("t", "BYTES", (-1,))]
    _, contents = encode_outputs([np.array(["\u00e9", b"x"], dtype=object)], spec, [], True)
    assert unpack_bytes("output 't'", contents[0], 2) == ["\u00e9".encode(), b"x"]
    with pytest.raises(RuntimeError, match="BYTES elements must be bytes or str, not int"):
        encode_outputs([np.array([1, 2], dtype=object)], spec, [], True)
    with pytest.raises(RuntimeError, match="return a numpy array of bytes or str, not a Tensor"):
        encode_outputs([torch.ones(2)], spec, [], True)
    # a host array of numbers (what the model's thread makes of a tensor) is taken in the
    # datatype the model declares, and only in that one
    fp32 = [TensorSpec("y", "FP32", (-1,))]
    _, contents = encode_outputs([np.ones(2, np.float32)], fp32, [], True)
    assert contents == [np.ones(2, np.float32).tobytes()]
    with pytest.raises(RuntimeError, match=r"'y' is float64 but the model declares FP32"):
        encode_outputs([np.ones(2)], fp32, [], True)
    with pytest.raises(RuntimeError, match=r"'y' has shape \[1, 2\] but the model declares"):
        encode_outputs([np.ones((1, 2), np.float32)], fp32, [], True)


def test_output_refusals_and_model_bugs() -> None:
    spec = [TensorSpec("y", "FP32", (-1,))]
    with pytest.raises(InvalidInputError, match=r"unknown output 'z'; the model returns y"):
        encode_outputs([torch.ones(1)], spec, ["z"], raw=True)
    with pytest.raises(RuntimeError, match=r"is torch\.float64 but the model declares FP32"):
        encode_outputs([torch.ones(1, dtype=torch.float64)], spec, [], raw=True)


def test_the_encoder_takes_host_memory_only_and_never_copies_from_a_device() -> None:
    # It runs on the event loop: a device-to-host copy there would stall every other request.
    spec = [TensorSpec("y", "FP32", (-1,))]
    with pytest.raises(RuntimeError, match="'y' reached the encoder on meta"):
        encode_outputs([torch.ones(2, device="meta")], spec, [], raw=True)


def test_a_request_built_by_tritonclient_decodes_to_the_same_values() -> None:
    values = np.arange(12, dtype=np.float32).reshape(4, 3)
    tensor = triton.InferInput("x", [4, 3], "FP32")
    tensor.set_data_from_numpy(values)
    request = triton.service_pb2.ModelInferRequest(model_name="m")
    request.inputs.extend([tensor._get_tensor()])
    request.raw_input_contents.extend([tensor._get_content()])
    ours = pb.ModelInferRequest.FromString(request.SerializeToString())
    (decoded,) = model_inputs(ours, [TensorSpec("x", "FP32", (-1, 3))])
    np.testing.assert_array_equal(decoded.numpy(), values)


HUGE = 2**63 - 1


@pytest.mark.parametrize("datatype", ["FP32", "FP64", "BOOL", "BYTES"])
@pytest.mark.parametrize("raw", [True, False])
@pytest.mark.parametrize("shape", [[0, HUGE, HUGE], [HUGE, 0, 1], [0, 1 << 40, 1 << 40]])
def test_shapes_too_large_for_a_message_are_refused_before_any_tensor_is_built(
    datatype: str, raw: bool, shape: list[int]
) -> None:
    request = pb.ModelInferRequest(model_name="m")
    request.inputs.add(name="x", datatype=datatype, shape=shape)
    if raw:
        request.raw_input_contents.append(b"")
    spec = TensorSpec("x", datatype, (-1, -1, -1))
    with pytest.raises(InvalidInputError, match=rf"input 'x': shape \[{shape[0]}, .* is too large"):
        decode_inputs(request, [spec])


def test_the_size_bound_is_what_one_message_can_carry() -> None:
    spec = TensorSpec("x", "FP32", (-1, -1))
    at_most = pb.ModelInferRequest(model_name="m")
    at_most.inputs.add(name="x", datatype="FP32", shape=[0, 1024 // 4])
    at_most.raw_input_contents.append(b"")
    (empty,) = model_inputs(at_most, [spec], max_message_bytes=1024)
    assert empty.shape == (0, 256)
    over = pb.ModelInferRequest()
    over.CopyFrom(at_most)
    over.inputs[0].shape[:] = [0, 1024 // 4 + 1]
    with pytest.raises(InvalidInputError, match="at most 1024 bytes carries at most 256 FP32"):
        decode_inputs(over, [spec], max_message_bytes=1024)
    typed = pb.ModelInferRequest()  # typed, an element may take a single byte
    typed.inputs.add(name="x", datatype="FP32", shape=[0, 1024])
    (empty,) = model_inputs(typed, [spec], max_message_bytes=1024)
    assert empty.shape == (0, 1024)
