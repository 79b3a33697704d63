"""The tensor operations of dynamic batching, along the first (batch) dimension: which
requests can share a run, joining their inputs, and slicing the outputs back per request."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from inference_service.dataplane.model_io import Tensor
from shared.app import TensorSpec
from shared.errors import InvalidInputError

# What requests that batch together share: each input's sizes beyond the first dimension.
ShapeKey = tuple[tuple[int, ...], ...]


def common_rows(specs: Sequence[TensorSpec], inputs: Sequence[Tensor]) -> int:
    """The number of rows (size of the first dimension) every input of one request has;
    InvalidInputError if they differ, since a batch is split back by rows."""
    if len(inputs) == 1:
        return int(inputs[0].shape[0])
    rows = {spec.name: int(t.shape[0]) for spec, t in zip(specs, inputs, strict=True)}
    if len(set(rows.values())) > 1:
        listed = ", ".join(f"{name!r} {count}" for name, count in rows.items())
        raise InvalidInputError(
            f"the inputs have different numbers of rows (first dimension: {listed}); every "
            "input of a request must have the same number of rows"
        )
    return next(iter(rows.values()), 1)


def shape_key(inputs: Sequence[Tensor]) -> ShapeKey:
    """Each input's sizes beyond the first dimension: requests join a batch only if equal."""
    if len(inputs) == 1:
        return (tuple(inputs[0].shape[1:]),)
    return tuple(tuple(t.shape[1:]) for t in inputs)


def join_rows(parts: Sequence[Tensor]) -> Tensor:
    """Parts of one input from several requests, joined along the batch dimension: numpy
    arrays (what decoding makes wherever numpy has the dtype) into one array, tensors into one
    tensor; a mixture as arrays."""
    if len(parts) == 1:  # a lone request's input, as it is
        return parts[0]
    tensors = [p for p in parts if isinstance(p, torch.Tensor)]
    if len(tensors) == len(parts):
        return torch.cat(tensors)
    return np.concatenate([p.numpy() if isinstance(p, torch.Tensor) else p for p in parts])


def check_rows(model: str, outputs: Sequence[Tensor], rows: int) -> None:
    """RuntimeError unless every output of a batch of `rows` rows has that many: outputs with
    another count would hand one request's rows to another."""
    shapes = [list(o.shape) for o in outputs]
    if any(not shape or shape[0] != rows for shape in shapes):
        raise RuntimeError(
            f"model {model!r} returned outputs of shapes {shapes} for a batch of "
            f"{rows} rows; a batched model must return one row per input row"
        )


def split_rows(outputs: Sequence[Tensor], rows: Sequence[int]) -> list[list[Tensor]]:
    """A batch's outputs sliced back per request, `rows[i]` rows for request i, in order."""
    parts: list[list[Tensor]] = []
    offset = 0
    for count in rows:
        parts.append([o[offset : offset + count] for o in outputs])
        offset += count
    return parts
