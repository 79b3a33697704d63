"""The experience batch on the wire: samples in, the same samples out, and every kind of batch
that does not match its buffer refused with a message that names what to fix."""

from __future__ import annotations

import json
import re

import pytest
import torch

from shared.app import TensorSpec
from shared.data.batch import BatchSchema, decode_batch, encode_batch, encode_columns
from shared.errors import MalformedBatchError, ResourceLimitError

SCHEMA = BatchSchema.of(
    "steps",
    [
        TensorSpec("obs", "FP32", (-1, 2)),
        TensorSpec("act", "INT64", ()),
        TensorSpec("done", "BOOL", (1,)),
    ],
)


def samples(count: int, rows: int = 3) -> list[dict[str, torch.Tensor]]:
    return [
        {
            "obs": torch.randn(rows, 2),
            "act": torch.tensor(i),
            "done": torch.tensor([i % 2 == 0]),
        }
        for i in range(count)
    ]


def raw(header: dict[str, object], data: bytes) -> bytes:
    body = json.dumps(header).encode()
    return len(body).to_bytes(8, "little") + body + data


def test_samples_come_back_exactly_each_its_own_copy() -> None:
    sent = samples(5)
    payload = encode_batch(sent)
    got = decode_batch(payload, SCHEMA)
    assert len(got) == 5
    for a, b in zip(got, sent, strict=True):
        assert list(a) == ["obs", "act", "done"]
        for name in b:
            assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name])
    got[0]["obs"].fill_(7.0)  # each sample owns its memory: the others are untouched
    assert torch.equal(got[1]["obs"], sent[1]["obs"])
    assert got[0]["obs"].untyped_storage().nbytes() == 3 * 2 * 4


def test_any_size_dimensions_take_any_size_the_same_within_a_batch() -> None:
    assert len(decode_batch(encode_batch(samples(2, rows=7)), SCHEMA)) == 2
    assert len(decode_batch(encode_batch(samples(2, rows=0)), SCHEMA)) == 2


def column_batch(**overrides: torch.Tensor) -> bytes:
    columns = {
        "obs": torch.zeros(4, 3, 2),
        "act": torch.zeros(4, dtype=torch.int64),
        "done": torch.zeros(4, 1, dtype=torch.bool),
    }
    columns.update(overrides)
    return encode_columns(columns)


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (
            column_batch(obs=torch.zeros(4, 3, 2, dtype=torch.float64)),
            "tensor 'obs' has dtype 'F64' but the buffer collects FP32 (F32)",
        ),
        (
            column_batch(obs=torch.zeros(4, 3, 3)),
            "tensor 'obs' has shape [4, 3, 3]: samples of shape [3, 3] but the buffer collects "
            "[-1, 2] (-1: any size)",
        ),
        (
            column_batch(act=torch.zeros(4, 1, dtype=torch.int64)),
            "tensor 'act' has shape [4, 1]: samples of shape [1] but the buffer collects []",
        ),
        (
            column_batch(act=torch.zeros(3, dtype=torch.int64)),
            "its tensors hold different sample counts (obs 4, act 3, done 4)",
        ),
        (
            encode_columns(
                {
                    "obs": torch.zeros(0, 3, 2),
                    "act": torch.zeros(0, dtype=torch.int64),
                    "done": torch.zeros(0, 1, dtype=torch.bool),
                }
            ),
            "it carries no samples; send at least one",
        ),
        (
            encode_columns({"obs": torch.zeros(4, 3, 2), "act": torch.zeros(4, dtype=torch.int64)}),
            "tensor(s) done missing; its samples hold obs, act, done",
        ),
        (
            encode_columns(
                {
                    "obs": torch.zeros(1, 3, 2),
                    "act": torch.zeros(1, dtype=torch.int64),
                    "done": torch.zeros(1, 1, dtype=torch.bool),
                    "reward": torch.zeros(1),
                }
            ),
            "tensor 'reward' is not one the buffer collects; its samples hold obs, act, done",
        ),
        (b"\x01\x02", "the payload has 2 bytes; a safetensors file has at least 8"),
        (
            (10**9).to_bytes(8, "little") + b"{}",
            "the safetensors header length 1000000000 exceeds the payload",
        ),
        (raw({}, b"")[:8] + b"{}" + b"x" * 0, "tensor(s) obs, act, done missing"),
        (b"\x04" + b"\x00" * 7 + b"nope", "the safetensors header is not JSON"),
        (b"\x02" + b"\x00" * 7 + b"[]", "the safetensors header must be a JSON object"),
        (
            raw(
                {
                    "obs": {"dtype": "F32", "shape": [1, 1, 2], "data_offsets": [0, 8]},
                    "act": {"dtype": "I64", "shape": [1], "data_offsets": [16, 24]},
                    "done": {"dtype": "BOOL", "shape": [1, 1], "data_offsets": [24, 25]},
                },
                b"\x00" * 25,
            ),
            "tensor 'act': data_offsets [16, 24) leaves a gap",
        ),
        (
            raw(
                {
                    "obs": {"dtype": "F32", "shape": [1, 1, 2], "data_offsets": [0, 8]},
                    "act": {"dtype": "I64", "shape": [1], "data_offsets": [8, 12]},
                    "done": {"dtype": "BOOL", "shape": [1, 1], "data_offsets": [12, 13]},
                },
                b"\x00" * 13,
            ),
            "tensor 'act': data_offsets span 4 bytes but INT64[1] needs 8",
        ),
        (
            raw(
                {
                    "obs": {"dtype": "F32", "shape": [1, 1, 2], "data_offsets": [0, 8]},
                    "act": {"dtype": "I64", "shape": [1], "data_offsets": [8, 16]},
                    "done": {"dtype": "BOOL", "shape": [1, 1], "data_offsets": [16, 17]},
                },
                b"\x00" * 20,
            ),
            "the header describes 17 data bytes but the payload carries 20",
        ),
        (
            raw({"obs": {"dtype": "F32", "shape": [1, 1, 2]}, "act": 1, "done": 2}, b""),
            "tensor 'obs': a header entry has exactly dtype, shape and data_offsets",
        ),
        (
            raw(
                {
                    "obs": {"dtype": "F32", "shape": [1, -1, 2], "data_offsets": [0, 8]},
                    "act": {"dtype": "I64", "shape": [1], "data_offsets": [8, 16]},
                    "done": {"dtype": "BOOL", "shape": [1, 1], "data_offsets": [16, 17]},
                },
                b"\x00" * 17,
            ),
            "tensor 'obs': shape [1, -1, 2] is not a list of sizes under 4294967296",
        ),
        (
            raw(
                {
                    "obs": {"dtype": "F32", "shape": [1, 2**62, 0], "data_offsets": [0, 0]},
                    "act": {"dtype": "I64", "shape": [1], "data_offsets": [0, 8]},
                    "done": {"dtype": "BOOL", "shape": [1, 1], "data_offsets": [8, 9]},
                },
                b"\x00" * 9,
            ),
            "tensor 'obs': shape [1, 4611686018427387904, 0] is not a list of sizes under",
        ),
    ],
)
def test_a_batch_that_does_not_match_its_buffer_is_refused(payload: bytes, message: str) -> None:
    with pytest.raises(MalformedBatchError, match=re.escape(message)) as refused:
        decode_batch(payload, SCHEMA)
    assert str(refused.value).startswith("batch for buffer 'steps': ")


def test_too_many_samples_are_over_the_limit() -> None:
    with pytest.raises(
        ResourceLimitError,
        match=re.escape(
            "batch for buffer 'steps': it carries 5 samples; a batch may carry at most 4"
        ),
    ):
        decode_batch(encode_batch(samples(5)), SCHEMA, max_samples=4)
    assert len(decode_batch(encode_batch(samples(4)), SCHEMA, max_samples=4)) == 4


def test_encoding_refuses_samples_that_do_not_stack() -> None:
    with pytest.raises(ValueError, match="a batch carries at least one sample"):
        encode_batch([])
    with pytest.raises(ValueError, match="the samples differ in tensor 'obs'"):
        encode_batch([{"obs": torch.zeros(2)}, {"obs": torch.zeros(3)}])
    with pytest.raises(ValueError, match="the samples differ in tensor 'obs'"):
        encode_batch([{"obs": torch.zeros(2)}, {"act": torch.zeros(2)}])
