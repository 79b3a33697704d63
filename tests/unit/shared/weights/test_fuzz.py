"""Property-based fuzzing of the header parser and the whole push path (hypothesis).

Whatever bytes arrive, the service answers with a domain error (which the gRPC layer maps to a
status) or commits exactly what the sender meant; it never crashes with anything else, and the
served weights are either untouched or bit-exact.
"""

from __future__ import annotations

import json

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from inference_service.served_model import ServedModel
from inference_service.syncplane.limits import SyncLimits
from inference_service.syncplane.parts import Commit, PushHeader
from inference_service.syncplane.service import SyncPlane
from shared.app import ModelSpec, TensorSpec
from shared.dtypes import BY_SAFETENSORS
from shared.errors import ServiceError
from shared.weights.digest import state_digest
from shared.weights.layout import TensorEntry, TensorLayout, parse_header
from shared.weights.reader import PayloadReader
from shared.weights.writer import Payload

LAYOUT = {
    "a": TensorLayout("F32", (3, 4)),
    "b": TensorLayout("BF16", (5,)),
    "c": TensorLayout("I64", ()),
    "d": TensorLayout("F32", (0, 2)),
}


class Sink:
    def write(self, entry: TensorEntry, offset: int, data: memoryview) -> None:
        assert offset >= 0 and offset + len(data) <= entry.layout.nbytes


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600), st.integers(min_value=0, max_value=700))
def test_arbitrary_bytes_never_crash_the_reader(blob: bytes, announced: int) -> None:
    try:
        reader = PayloadReader(announced, LAYOUT, Sink(), max_header_bytes=512)
        reader.feed(blob)
        reader.finish()
    except ServiceError:
        pass


entries = st.fixed_dictionaries(
    {
        "dtype": st.sampled_from(["F32", "BF16", "I64", "F16", "U8", "X"]),
        "shape": st.lists(st.integers(min_value=-1, max_value=6), max_size=3),
        "data_offsets": st.lists(st.integers(min_value=-2, max_value=80), min_size=0, max_size=3),
    }
)
tables = st.dictionaries(
    st.sampled_from(["a", "b", "c", "d", "e", "__metadata__"]), entries, max_size=5
)


@settings(max_examples=400, deadline=None)
@given(tables, st.integers(min_value=0, max_value=100))
def test_a_header_is_refused_or_describes_exactly_the_data(
    table: dict[str, object], size: int
) -> None:
    try:
        parsed = parse_header(json.dumps(table).encode(), size, LAYOUT).entries
    except ServiceError:
        return
    position = 0
    for entry in parsed:
        assert entry.layout == LAYOUT[entry.name]
        assert entry.begin == position
        assert entry.end - entry.begin == entry.layout.nbytes
        position = entry.end
    assert position == size
    assert sum(BY_SAFETENSORS[e.layout.dtype].itemsize >= 1 for e in parsed) == len(parsed)


SPEC = ModelSpec(
    "m", lambda: None, (TensorSpec("x", "FP32", (-1, 4)),), (TensorSpec("y", "FP32", (-1, 3)),)
)  # type: ignore[arg-type,return-value]


def served() -> ServedModel:
    torch.manual_seed(0)
    return ServedModel(SPEC, nn.Linear(4, 3), lambda m, x: m(x), True, torch.device("cpu"))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.tuples(st.integers(min_value=0, max_value=400), st.integers(min_value=0, max_value=255)),
        max_size=3,
    ),
    st.integers(min_value=0, max_value=500),
    st.integers(min_value=1, max_value=64),
    st.booleans(),
)
def test_a_mangled_push_commits_exactly_or_changes_nothing(
    flips: list[tuple[int, int]], cut: int, chunk: int, keep_commit: bool
) -> None:
    model = served()
    plane = SyncPlane({"m": model}, SyncLimits(drain_timeout_s=1))
    before = {k: v.clone() for k, v in model.live.module.state_dict().items()}
    target = {k: v + 1 for k, v in before.items()}
    blob = bytearray(b"".join(Payload.of(list(target.items())).chunks()))
    for position, value in flips:
        if position < len(blob):
            blob[position] = value
    sent = bytes(blob[: len(blob) - cut if cut < len(blob) else len(blob)])
    parts: list[bytes | Commit] = [sent[i : i + chunk] for i in range(0, len(sent), chunk)]
    if keep_commit:
        parts.append(Commit(state_digest(target)))
    header = PushHeader("m", 1, 0, "fuzz", len(blob))
    try:
        plane.applier.apply(header, iter(parts))
    except ServiceError:
        expected = before
    else:
        expected = target
    live = model.live.module.state_dict()
    for name, tensor in expected.items():
        assert torch.equal(live[name], tensor), name
    assert model.live.digest == state_digest(expected)


# Headers as an attacker writes them: any JSON value (floats, huge integers, deep nesting,
# strings where numbers belong), and valid headers with bytes inserted, removed or replaced.
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**40), max_value=10**40)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.sampled_from(["a", "dtype", "shape", "data_offsets", "x"]), children)
    ),
    max_leaves=20,
)


def _dumps(value: object) -> bytes:
    return json.dumps(value, allow_nan=True).encode()


@st.composite
def hostile_headers(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["value", "table", "mutated", "deep", "huge-int"]))
    if kind == "value":
        return _dumps(draw(json_values))
    if kind == "table":
        return _dumps(draw(st.dictionaries(st.sampled_from(["a", "b", "c", "d"]), json_values)))
    if kind == "deep":
        depth = draw(st.integers(min_value=100, max_value=200_000))
        opener = draw(st.sampled_from(["[", '{"a":']))
        return (opener * depth).encode()
    if kind == "huge-int":
        digits = draw(st.integers(min_value=300, max_value=20_000))
        field = draw(st.sampled_from(["shape", "data_offsets"]))
        entry = {"dtype": "F32", "shape": [3, 4], "data_offsets": [0, 48]}
        text = _dumps({"a": entry}).decode()
        return text.replace(f'"{field}": [', f'"{field}": [{"9" * digits}, ', 1).encode()
    body = bytearray(_dumps({"a": {"dtype": "F32", "shape": [3, 4], "data_offsets": [0, 48]}}))
    for _ in range(draw(st.integers(min_value=1, max_value=4))):
        at = draw(st.integers(min_value=0, max_value=len(body)))
        action = draw(st.sampled_from(["insert", "delete", "replace"]))
        byte = draw(st.integers(min_value=0, max_value=255))
        if action == "insert":
            body.insert(at, byte)
        elif at < len(body):
            if action == "delete":
                del body[at]
            else:
                body[at] = byte
    return bytes(body)


@settings(max_examples=400, deadline=None)
@given(hostile_headers(), st.integers(min_value=0, max_value=100))
def test_a_hostile_header_is_refused_with_a_domain_error_or_describes_the_data(
    body: bytes, size: int
) -> None:
    """Anything but a ServiceError (a RecursionError, a ValueError from int parsing, ...) would
    reach the client as INTERNAL."""
    try:
        parsed = parse_header(body, size, LAYOUT).entries
    except ServiceError:
        return
    assert sum(entry.end - entry.begin for entry in parsed) == size
    for entry in parsed:
        assert entry.layout == LAYOUT[entry.name]
