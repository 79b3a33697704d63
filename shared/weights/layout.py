"""The safetensors layout: tensor layouts, building a header, and checking one that arrived.

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON mapping each tensor
name to {dtype, shape, data_offsets: [begin, end)} (offsets relative to the end of the header),
then the tensors' packed little-endian bytes, which must cover the data area with no gap or
overlap. We write and read that format in a stream rather than through safetensors' bytes API,
which builds (and copies) the whole blob; the library still reads what we write (tested).

A tensor sent encoded against the push's base (shared/weights/encoding.py) travels as a byte
entry, `{"dtype": "U8", "shape": [encoded bytes]}`, described in `__metadata__` under
`weightsync.encodings`: a JSON object mapping each such tensor's name to its `encoding` and its
real `dtype` and `shape`, which must be the model's.

A tensor the sender holds under several names (tied: shared/weights/ties.py) travels once, under
one of them; `__metadata__` maps each other name to the name it travels under, in
`weightsync.tied`. A tied name must be a tensor of the model with the same layout as the one it
names, that one must be carried, and the tied name must not be.
"""

from __future__ import annotations

import functools
import json
import math
import sys
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

import torch

from shared.dtypes import BY_SAFETENSORS, BY_TORCH
from shared.errors import MalformedPushError
from shared.weights.encoding import ENCODINGS

# safetensors' own limit on the JSON header.
MAX_HEADER_BYTES = 100_000_000
# The `__metadata__` key that describes the encoded tensors of a payload.
ENCODINGS_KEY = "weightsync.encodings"
# The `__metadata__` key that names the tensors sent under another name (tied).
TIED_KEY = "weightsync.tied"


@dataclass(frozen=True)
class TensorLayout:
    """What a model expects of one tensor: its safetensors dtype name and shape."""

    dtype: str
    shape: tuple[int, ...]

    @functools.cached_property
    def nbytes(self) -> int:
        return math.prod(self.shape) * BY_SAFETENSORS[self.dtype].itemsize

    @classmethod
    def of(cls, tensor: torch.Tensor) -> TensorLayout:
        return cls.of_torch(tensor.dtype, tensor.shape)

    @classmethod
    def of_torch(cls, dtype: torch.dtype, shape: Sequence[int]) -> TensorLayout:
        """The layout of a tensor of torch `dtype` and `shape`."""
        name = entry.safetensors if (entry := BY_TORCH.get(dtype)) else None
        if name is None:
            raise TypeError(f"dtype {dtype} cannot travel in safetensors framing")
        return cls(name, tuple(shape))


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a payload: name, layout, and its byte range in the data area; `encoding`
    names how those bytes describe it against the push's base (None: they are its bytes)."""

    name: str
    layout: TensorLayout
    begin: int
    end: int
    encoding: str | None = None


def build_header(
    tensors: Sequence[tuple[str, TensorLayout]],
    metadata: Mapping[str, str] | None = None,
    encoded: Mapping[str, tuple[str, int]] | None = None,
    tied: Mapping[str, str] | None = None,
) -> tuple[bytes, list[TensorEntry]]:
    """The 8-byte length plus JSON header for `tensors`, laid out back to back in that order.

    `encoded` maps the tensors sent encoded to their encoding and encoded size in bytes;
    `tied` maps names not carried to the carried name whose tensor they hold."""
    entries: list[TensorEntry] = []
    offset = 0
    metadata = dict(metadata or {})
    described: dict[str, object] = {}
    table: dict[str, object] = {}
    for name, layout in tensors:
        encoding, size = (encoded or {}).get(name, (None, layout.nbytes))
        entry = TensorEntry(name, layout, offset, offset + size, encoding)
        entries.append(entry)
        dtype, shape = (layout.dtype, list(layout.shape)) if encoding is None else ("U8", [size])
        table[name] = {"dtype": dtype, "shape": shape, "data_offsets": [entry.begin, entry.end]}
        if encoding is not None:
            described[name] = {
                "encoding": encoding,
                "dtype": layout.dtype,
                "shape": list(layout.shape),
            }
        offset = entry.end
    if described:
        metadata[ENCODINGS_KEY] = json.dumps(described, separators=(",", ":"))
    if tied:
        metadata[TIED_KEY] = json.dumps(dict(tied), separators=(",", ":"))
    if metadata:
        table = {"__metadata__": metadata, **table}
    body = json.dumps(table, separators=(",", ":")).encode()
    body += b" " * (-len(body) % 8)  # safetensors pads the header to 8-byte alignment
    return len(body).to_bytes(8, "little") + body, entries


@dataclass(frozen=True)
class Header:
    """A received payload header: the tensors carried, by offset, and the names tied to them
    (name -> the carried name whose tensor it holds)."""

    entries: list[TensorEntry]
    tied: dict[str, str]


def parse_header(body: bytes, data_bytes: int, expected: Mapping[str, TensorLayout]) -> Header:
    """Check a received JSON header against the model's tensors; return its entries by offset
    and its tied names.

    `data_bytes` is the size of the data area the sender announced. Every check names the tensor
    and the problem, since the sender needs to know what to fix.
    """
    try:
        table = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MalformedPushError(f"safetensors header is not valid JSON: {exc}") from None
    except RecursionError:
        raise MalformedPushError(
            "safetensors header nests arrays or objects too deeply to be parsed"
        ) from None
    except ValueError:  # an integer longer than Python converts (sys.get_int_max_str_digits)
        raise MalformedPushError(
            f"safetensors header holds an integer of more than {sys.get_int_max_str_digits()} "
            "digits; sizes and offsets are far shorter"
        ) from None
    if not isinstance(table, dict):
        raise MalformedPushError("safetensors header must be a JSON object")
    metadata = table.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise MalformedPushError("safetensors __metadata__ must map strings to strings")
    encodings = _parse_encodings(metadata.get(ENCODINGS_KEY), expected)
    entries = [_parse_entry(name, info, expected, encodings) for name, info in table.items()]
    if missing := sorted(encodings.keys() - table.keys()):
        raise MalformedPushError(
            f"{ENCODINGS_KEY} describes {', '.join(map(repr, missing[:10]))}, which the "
            "payload does not carry"
        )
    tied = _parse_tied(metadata.get(TIED_KEY), expected, table.keys())
    entries.sort(key=lambda e: (e.begin, e.end))
    position = 0
    for entry in entries:
        if entry.begin != position:
            kind = "overlaps the previous tensor" if entry.begin < position else "leaves a gap"
            raise MalformedPushError(
                f"tensor {entry.name!r}: data_offsets [{entry.begin}, {entry.end}) {kind} "
                f"(expected it to start at {position})"
            )
        position = entry.end
    if position != data_bytes:
        raise MalformedPushError(
            f"safetensors header describes {position} data bytes but the push carries {data_bytes}"
        )
    return Header(entries, tied)


def _parse_tied(
    text: str | None, expected: Mapping[str, TensorLayout], carried: Collection[str]
) -> dict[str, str]:
    """The tied names the metadata declares, each checked against the model and the tensors
    carried."""
    if text is None:
        return {}
    want = "a JSON object mapping names to names"
    declared = _metadata_object(text, TIED_KEY, want)
    tied = {name: source for name, source in declared.items() if isinstance(source, str)}
    if len(tied) != len(declared):
        raise MalformedPushError(f"__metadata__[{TIED_KEY!r}] must be {want}")
    for name, source in tied.items():
        for which in (name, source):
            if which not in expected:
                raise MalformedPushError(f"{TIED_KEY}: unknown tensor {which!r}")
        if expected[name] != expected[source]:
            raise MalformedPushError(
                f"{TIED_KEY}: tensor {name!r} ({expected[name].dtype}"
                f"{list(expected[name].shape)}) cannot hold {source!r} "
                f"({expected[source].dtype}{list(expected[source].shape)})"
            )
        if name in carried:
            raise MalformedPushError(
                f"{TIED_KEY}: tensor {name!r} is carried, so it cannot also be tied to {source!r}"
            )
        if source not in carried:
            raise MalformedPushError(
                f"{TIED_KEY}: tensor {name!r} is tied to {source!r}, which the payload does "
                "not carry"
            )
    return tied


def _metadata_object(text: str, key: str, want: str) -> dict[str, object]:
    """The JSON object `__metadata__[key]` holds; MalformedPushError saying it must be `want`
    where it holds anything else."""
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, RecursionError, ValueError):
        value = None
    if not isinstance(value, dict):
        raise MalformedPushError(f"__metadata__[{key!r}] must be {want}")
    return value


def _parse_encodings(text: str | None, expected: Mapping[str, TensorLayout]) -> dict[str, str]:
    """The encoding of each tensor the metadata describes as encoded, checked against the
    model."""
    if text is None:
        return {}
    described = _metadata_object(text, ENCODINGS_KEY, "a JSON object")
    encodings: dict[str, str] = {}
    for name, info in described.items():
        want = expected.get(name)
        if want is None:
            raise MalformedPushError(f"{ENCODINGS_KEY}: unknown tensor {name!r}")
        if not isinstance(info, dict) or set(info) != {"encoding", "dtype", "shape"}:
            raise MalformedPushError(
                f"{ENCODINGS_KEY}: tensor {name!r} must have exactly encoding, dtype and shape"
            )
        if info["encoding"] not in ENCODINGS:
            raise MalformedPushError(
                f"tensor {name!r}: unknown encoding {info['encoding']!r} "
                f"(known: {', '.join(ENCODINGS)})"
            )
        if info["dtype"] != want.dtype or info["shape"] != list(want.shape):
            raise MalformedPushError(
                f"tensor {name!r}: encoded as {info['dtype']}{info['shape']} but the model has "
                f"{want.dtype}{list(want.shape)}"
            )
        encodings[name] = info["encoding"]
    return encodings


def _parse_entry(
    name: str, info: object, expected: Mapping[str, TensorLayout], encodings: Mapping[str, str]
) -> TensorEntry:
    want = expected.get(name)
    if want is None:
        known = ", ".join(sorted(expected)[:10])
        raise MalformedPushError(f"unknown tensor {name!r}; this model has: {known}")
    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        raise MalformedPushError(
            f"tensor {name!r}: header entry must have exactly dtype, shape and data_offsets"
        )
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise MalformedPushError(f"tensor {name!r}: shape {shape!r} is not a list of sizes")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(type(o) is int and o >= 0 for o in offsets)
        or offsets[0] > offsets[1]
    ):
        raise MalformedPushError(f"tensor {name!r}: data_offsets {offsets!r} is not [begin, end)")
    begin, end = offsets
    encoding = encodings.get(name)
    if encoding is not None:
        if dtype != "U8" or shape != [end - begin]:
            raise MalformedPushError(
                f"tensor {name!r} is encoded ({encoding}): its entry must be U8 of shape "
                f"[{end - begin}], not {dtype}{shape}"
            )
        if not 0 < end - begin < want.nbytes:
            raise MalformedPushError(
                f"tensor {name!r}: {end - begin} encoded bytes; an encoding is sent only where "
                f"it is shorter than the {want.nbytes} bytes of the tensor"
            )
        return TensorEntry(name, want, begin, end, encoding)
    if dtype != want.dtype:
        raise MalformedPushError(f"tensor {name!r}: dtype {dtype!r} but the model has {want.dtype}")
    if tuple(shape) != want.shape:
        raise MalformedPushError(
            f"tensor {name!r}: shape {shape} but the model has {list(want.shape)}"
        )
    if end - begin != want.nbytes:
        raise MalformedPushError(
            f"tensor {name!r}: data_offsets span {end - begin} bytes but {dtype}{shape} "
            f"needs {want.nbytes}"
        )
    return TensorEntry(name, want, begin, end)
