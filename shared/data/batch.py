"""A batch of experience on the wire: the samples for one buffer as one safetensors file.

Each tensor a buffer's samples hold travels as one tensor of the file, the samples stacked along
a new first dimension, so every tensor of a batch has the same first size: the sample count.
The agent's `RemoteDataCollector` encodes batches here, and the trainer's experience plane
decodes them against the buffer's schema (`BatchSchema`): names, dtypes, shapes, sample counts
and the framing are all checked before anything is stored, and a refusal names what to fix.
"""

from __future__ import annotations

import json
import math
import sys
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from shared.errors import MalformedBatchError, ResourceLimitError

if TYPE_CHECKING:
    import torch

    from shared.app import TensorSpec

# The most samples one batch may carry: a tensor of zero-sized samples costs no bytes, so the
# byte limit alone would not bound the work a batch makes.
MAX_BATCH_SAMPLES = 65536
# Headers name a few tensors; anything much longer is not a batch.
MAX_HEADER_BYTES = 1 << 16
# The largest size of a dimension: beyond, only a tensor with another dimension of size 0
# could fit any payload, and torch cannot hold every such shape.
MAX_DIMENSION = 1 << 32

Sample = Mapping[str, "torch.Tensor"]


@dataclass(frozen=True)
class Column:
    """One tensor of a buffer's samples: its name, OIP datatype and shape per sample (-1: any
    size, the same for every sample of a batch)."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    @property
    def safetensors(self) -> str:
        from shared.dtypes import BY_OIP

        name = BY_OIP[self.datatype].safetensors
        assert name is not None  # BYTES is refused when a buffer is declared
        return name

    def fits(self, shape: Sequence[int]) -> bool:
        """Whether a sample of `shape` fits this column."""
        return len(shape) == len(self.shape) and all(
            want in (-1, got) for want, got in zip(self.shape, shape, strict=True)
        )


@dataclass(frozen=True)
class BatchSchema:
    """What the samples of the buffer `buffer` hold, in declaration order."""

    buffer: str
    columns: tuple[Column, ...]

    @classmethod
    def of(cls, buffer: str, tensors: Iterable[TensorSpec]) -> BatchSchema:
        return cls(buffer, tuple(Column(t.name, t.datatype, tuple(t.shape)) for t in tensors))

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.columns]


def encode_batch(samples: Sequence[Sample]) -> bytes:
    """The payload of a batch of `samples` (each the same names, dtypes and shapes).

    Raises:
        ValueError: There are no samples, or they differ in names, dtypes or shapes.
    """
    return b"".join(batch_pieces(samples))


def batch_pieces(samples: Sequence[Sample]) -> list[bytes | memoryview]:
    """The payload of a batch of `samples` as pieces to join: its header, then views of each
    tensor's samples stacked (the stacking is the one copy made here; torch makes it without
    holding the GIL, so the agent's thread collects meanwhile).

    Raises:
        ValueError: There are no samples, or they differ in names, dtypes or shapes.
    """
    import torch

    if not samples:
        raise ValueError("a batch carries at least one sample")
    names = list(samples[0])
    columns: dict[str, torch.Tensor] = {}
    for name in names:
        try:
            columns[name] = torch.stack([s[name] for s in samples])
        except (KeyError, RuntimeError) as exc:
            raise ValueError(f"the samples differ in tensor {name!r}: {exc}") from None
    if any(len(s) != len(names) for s in samples):
        raise ValueError(f"the samples do not all hold exactly the tensors {names}")
    return column_pieces(columns)


def encode_columns(columns: Mapping[str, torch.Tensor]) -> bytes:
    """The payload of a batch given as stacked tensors (samples along the first dimension)."""
    return b"".join(column_pieces(columns))


def column_pieces(columns: Mapping[str, torch.Tensor]) -> list[bytes | memoryview]:
    """The payload of a batch given as stacked tensors, as its header and views of them."""
    from shared.weights.digest import byte_view
    from shared.weights.layout import TensorLayout, build_header

    cpu = {name: t.detach().to("cpu").contiguous() for name, t in columns.items()}
    header, _ = build_header([(name, TensorLayout.of(t)) for name, t in cpu.items()])
    return [header, *(byte_view(t) for t in cpu.values())]


def decode_batch(
    payload: bytes | memoryview, schema: BatchSchema, max_samples: int = MAX_BATCH_SAMPLES
) -> list[dict[str, torch.Tensor]]:
    """The samples of a batch for `schema`'s buffer, each tensor a copy of its own.

    Raises:
        MalformedBatchError: The payload is not a safetensors file of the buffer's tensors.
        ResourceLimitError: It carries more than `max_samples` samples.
    """
    stacked = decode_columns(payload, schema, max_samples)
    # Each sample a copy of its own: a view would keep its whole batch alive for as long as
    # the buffer keeps that one sample (a random-replacement buffer could keep a batch per
    # sample it holds).
    names = schema.names
    count = len(next(iter(stacked.values())))
    return [{n: stacked[n][i].clone() for n in names} for i in range(count)]


def decode_columns(
    payload: bytes | memoryview, schema: BatchSchema, max_samples: int = MAX_BATCH_SAMPLES
) -> dict[str, torch.Tensor]:
    """A batch for `schema`'s buffer, checked whole, as one tensor per name (the samples along
    the first dimension, at least one), each a read-only view of `payload`.

    Raises:
        MalformedBatchError: The payload is not a safetensors file of the buffer's tensors.
        ResourceLimitError: It carries more than `max_samples` samples.
    """
    import torch

    from shared.dtypes import BY_SAFETENSORS

    view = memoryview(payload).cast("B")
    where = f"batch for buffer {schema.buffer!r}"
    if len(view) < 8:
        raise MalformedBatchError(
            f"{where}: the payload has {len(view)} bytes; a safetensors file has at least 8"
        )
    header_bytes = int.from_bytes(view[:8], "little")
    if header_bytes > min(MAX_HEADER_BYTES, len(view) - 8):
        raise MalformedBatchError(
            f"{where}: the safetensors header length {header_bytes} exceeds the payload or the "
            f"{MAX_HEADER_BYTES}-byte limit on headers"
        )
    table = _header(bytes(view[8 : 8 + header_bytes]), where)
    data = view[8 + header_bytes :]
    entries = _entries(table, schema, where)
    counts = {name: shape[0] for name, (_, shape, _) in entries.items()}
    count = next(iter(counts.values()))
    if len(set(counts.values())) != 1:
        listed = ", ".join(f"{n} {c}" for n, c in counts.items())
        raise MalformedBatchError(
            f"{where}: its tensors hold different sample counts ({listed}); the first dimension "
            "counts the samples and must be the same for every tensor"
        )
    if count == 0:
        raise MalformedBatchError(f"{where}: it carries no samples; send at least one")
    if count > max_samples:
        raise ResourceLimitError(
            f"{where}: it carries {count} samples; a batch may carry at most {max_samples}"
        )
    position = 0
    for name, (column, shape, (begin, end)) in sorted(entries.items(), key=lambda e: e[1][2]):
        if begin != position:
            kind = "overlaps the previous tensor" if begin < position else "leaves a gap"
            raise MalformedBatchError(
                f"{where}: tensor {name!r}: data_offsets [{begin}, {end}) {kind}"
            )
        need = math.prod(shape) * BY_SAFETENSORS[column.safetensors].itemsize
        if end - begin != need:
            raise MalformedBatchError(
                f"{where}: tensor {name!r}: data_offsets span {end - begin} bytes but "
                f"{column.datatype}{list(shape)} needs {need}"
            )
        position = end
    if position != len(data):
        raise MalformedBatchError(
            f"{where}: the header describes {position} data bytes but the payload carries "
            f"{len(data)}"
        )
    stacked: dict[str, torch.Tensor] = {}
    for name, (column, shape, (begin, end)) in entries.items():
        dtype = BY_SAFETENSORS[column.safetensors].torch_dtype
        assert dtype is not None  # every safetensors dtype has a torch dtype
        if begin == end:
            stacked[name] = torch.empty(shape, dtype=dtype)
        else:
            # A read-only view of the payload: the caller copies what it keeps.
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", "The given buffer is not writable")
                flat = torch.frombuffer(data[begin:end], dtype=dtype)
            stacked[name] = flat.reshape(shape)
    return {name: stacked[name] for name in schema.names}


def _header(body: bytes, where: str) -> dict[str, Any]:
    try:
        table = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MalformedBatchError(f"{where}: the safetensors header is not JSON: {exc}") from None
    except RecursionError:
        raise MalformedBatchError(f"{where}: the safetensors header nests too deeply") from None
    except ValueError:
        raise MalformedBatchError(
            f"{where}: the safetensors header holds an integer of more than "
            f"{sys.get_int_max_str_digits()} digits"
        ) from None
    if not isinstance(table, dict):
        raise MalformedBatchError(f"{where}: the safetensors header must be a JSON object")
    table.pop("__metadata__", None)
    return table


def _entries(
    table: dict[str, Any], schema: BatchSchema, where: str
) -> dict[str, tuple[Column, tuple[int, ...], tuple[int, int]]]:
    """Each tensor's column, shape and data offsets, checked against the schema."""
    columns = {c.name: c for c in schema.columns}
    holds = ", ".join(schema.names)
    unknown = [name for name in table if name not in columns]
    if unknown:
        raise MalformedBatchError(
            f"{where}: tensor {unknown[0]!r} is not one the buffer collects; its samples hold "
            f"{holds}"
        )
    missing = [name for name in schema.names if name not in table]
    if missing:
        raise MalformedBatchError(
            f"{where}: tensor(s) {', '.join(missing)} missing; its samples hold {holds}"
        )
    found = {}
    for name, info in table.items():
        column = columns[name]
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise MalformedBatchError(
                f"{where}: tensor {name!r}: a header entry has exactly dtype, shape and "
                "data_offsets"
            )
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if dtype != column.safetensors:
            raise MalformedBatchError(
                f"{where}: tensor {name!r} has dtype {dtype!r} but the buffer collects "
                f"{column.datatype} ({column.safetensors})"
            )
        if not isinstance(shape, list) or not all(
            type(d) is int and 0 <= d < MAX_DIMENSION for d in shape
        ):
            raise MalformedBatchError(
                f"{where}: tensor {name!r}: shape {shape!r} is not a list of sizes under "
                f"{MAX_DIMENSION}"
            )
        if not shape or not column.fits(shape[1:]):
            raise MalformedBatchError(
                f"{where}: tensor {name!r} has shape {shape}: samples of shape {shape[1:]} but "
                f"the buffer collects {list(column.shape)} (-1: any size), stacked along a "
                "first dimension that counts the samples"
            )
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(type(o) is int and o >= 0 for o in offsets)
            or offsets[0] > offsets[1]
        ):
            raise MalformedBatchError(
                f"{where}: tensor {name!r}: data_offsets {offsets!r} is not [begin, end)"
            )
        found[name] = (column, tuple(shape), (offsets[0], offsets[1]))
    return found
