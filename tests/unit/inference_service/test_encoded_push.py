"""Delta pushes whose tensors travel encoded, applied in process: decoded against the live copy,
bit-exact; bad encoded bytes or headers refused with nothing changed."""

from __future__ import annotations

import json
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from torch import nn

from inference_service.served_model import ServedModel
from inference_service.syncplane.limits import SyncLimits
from inference_service.syncplane.parts import Commit, PushHeader
from inference_service.syncplane.service import SyncPlane
from shared.app import ModelSpec, TensorSpec
from shared.errors import MalformedPushError
from shared.weights.digest import state_digest
from shared.weights.encoding import ENCODINGS, SPARSE, XOR_ZSTD, encode
from shared.weights.layout import ENCODINGS_KEY
from shared.weights.writer import Payload

SPEC = ModelSpec(
    "m",
    lambda: None,
    (TensorSpec("x", "FP32", (-1, 64)),),  # type: ignore[arg-type,return-value]
    (TensorSpec("y", "FP32", (-1, 8)),),
)


def module() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8)).to(torch.bfloat16)


def flat(tensor: torch.Tensor) -> np.ndarray:
    return tensor.contiguous().reshape(-1).view(torch.uint8).numpy()


@pytest.fixture
def model() -> ServedModel:
    return ServedModel(SPEC, module(), lambda m, x: m(x), True, torch.device("cpu"))


@pytest.fixture
def plane(model: ServedModel) -> SyncPlane:
    return SyncPlane({"m": model}, SyncLimits(max_payload_bytes=1 << 20, drain_timeout_s=0.5))


def state_of(model: ServedModel) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.live.module.state_dict().items()}


def nudged(state: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """`state` with a few percent of each tensor's elements moved."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, tensor in state.items():
        moved = torch.rand(tensor.shape, generator=g) < 0.03
        out[name] = torch.where(moved, tensor * 1.5 + 0.01, tensor)
    return out


def encoded_payload(
    new: dict[str, torch.Tensor], base: dict[str, torch.Tensor], encoding: str
) -> Payload:
    encoded = {}
    for name, tensor in new.items():
        data = encode(encoding, flat(tensor), flat(base[name]), tensor.element_size())
        if data is not None:
            encoded[name] = (encoding, data)
    assert encoded
    return Payload.of(list(new.items()), encoded=encoded)


def apply(
    plane: SyncPlane, payload: Payload | bytes, version: int, base: int, digest: bytes
) -> int:
    data = payload if isinstance(payload, bytes) else b"".join(payload.chunks())
    header = PushHeader("m", version, base, "trainer-a", len(data))

    def body() -> Iterator[bytes | Commit]:
        for start in range(0, len(data), 1000):
            yield data[start : start + 1000]
        yield Commit(digest)

    return plane.applier.apply(header, body()).version


def assert_state(model: ServedModel, state: dict[str, torch.Tensor]) -> None:
    live = model.live.module.state_dict()
    for name, tensor in state.items():
        assert flat(live[name]).tobytes() == flat(tensor).tobytes(), name
    assert model.live.digest == state_digest(state)


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_encoded_deltas_decode_against_the_served_version_bit_exactly(
    model: ServedModel, plane: SyncPlane, encoding: str
) -> None:
    state = state_of(model)
    apply(plane, Payload.of(list(state.items())), 1, 0, state_digest(state))
    for version in range(2, 6):
        new = nudged(state, version)
        apply(plane, encoded_payload(new, state, encoding), version, version - 1, state_digest(new))
        assert_state(model, new)
        state = new


def corrupt(payload: Payload, at: int) -> bytes:
    data = bytearray(b"".join(payload.chunks()))
    data[len(payload.header) + at] ^= 0xFF
    return bytes(data)


@pytest.mark.parametrize(
    ("encoding", "at", "message"),
    [
        (SPARSE, 0, "sparse bytes do not decode against the base"),
        (XOR_ZSTD, 0, "xor-zstd bytes do not decode against the base: not a zstd frame"),
        (SPARSE, -1, "digest mismatch"),  # a flipped value decodes, and the digest catches it
    ],
)
def test_corrupt_encoded_bytes_are_refused_and_change_nothing(
    model: ServedModel, plane: SyncPlane, encoding: str, at: int, message: str
) -> None:
    state = state_of(model)
    apply(plane, Payload.of(list(state.items())), 1, 0, state_digest(state))
    new = nudged(state, 9)
    payload = encoded_payload(new, state, encoding)
    data_bytes = payload.nbytes - len(payload.header)
    with pytest.raises(MalformedPushError, match=message):
        apply(plane, corrupt(payload, at % data_bytes), 2, 1, state_digest(new))
    assert_state(model, state)
    assert model.live.version == 1


def test_an_encoded_tensor_in_a_full_push_is_refused(model: ServedModel, plane: SyncPlane) -> None:
    state = state_of(model)
    new = nudged(state, 3)
    with pytest.raises(MalformedPushError, match="a full push has no base to decode it against"):
        apply(plane, encoded_payload(new, state, SPARSE), 1, 0, state_digest(new))
    assert model.live.version == 0
    assert_state(model, state)


def rewritten(payload: Payload, change: dict[str, object]) -> bytes:
    """The payload with its JSON header updated by `change` (entries or metadata)."""
    table = json.loads(payload.header[8:])
    for key, value in change.items():
        table[key] = value
    body = json.dumps(table).encode()
    body += b" " * (-len(body) % 8)
    data = b"".join(payload.chunks())[len(payload.header) :]
    return len(body).to_bytes(8, "little") + body + data


def test_bad_encoding_descriptions_are_refused(model: ServedModel, plane: SyncPlane) -> None:
    state = state_of(model)
    apply(plane, Payload.of(list(state.items())), 1, 0, state_digest(state))
    new = nudged(state, 4)
    payload = encoded_payload(new, state, SPARSE)
    meta = json.loads(json.loads(payload.header[8:])["__metadata__"][ENCODINGS_KEY])
    name = next(iter(meta))
    cases = {
        "unknown encoding 'gzip'": {**meta, name: {**meta[name], "encoding": "gzip"}},
        "encoded as F32": {**meta, name: {**meta[name], "dtype": "F32"}},
        "unknown tensor 'nope'": {**meta, "nope": meta[name]},
    }
    for message, described in cases.items():
        data = rewritten(payload, {"__metadata__": {ENCODINGS_KEY: json.dumps(described)}})
        with pytest.raises(MalformedPushError, match=message):
            apply(plane, data, 2, 1, state_digest(new))
    data = rewritten(payload, {"__metadata__": {ENCODINGS_KEY: "[1"}})
    with pytest.raises(MalformedPushError, match="must be a JSON object"):
        apply(plane, data, 2, 1, state_digest(new))
    assert_state(model, state)
