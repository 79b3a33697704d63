"""Nested state (optimizer and scheduler state dicts) as one safetensors file, without pickle.

A tree is dicts, lists and tuples of tensors and JSON scalars (int, float including inf and nan,
str, bool, None). Its tensors go in the file's tensor area under flattened keys; the structure
around them goes as JSON in the file's `__metadata__`, every node tagged with its kind, so that
int dict keys stay ints, tuples stay tuples and bools stay bools:

    {"t": key}       a tensor, stored under `key`
    {"d": [[k, v]]}  a dict; a key is a str, or {"i": n} for the int n
    {"l": [...]}     a list
    {"u": [...]}     a tuple
    {"f": "inf"}     a float that JSON cannot hold: inf, -inf or nan
    {"v": x}         any other scalar
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from safetensors import safe_open

STRUCTURE_KEY = "weightsync.tree"


def _encode_key(key: object, where: str) -> Any:
    if isinstance(key, str):
        return key
    if isinstance(key, int) and not isinstance(key, bool):
        return {"i": key}
    raise TypeError(f"cannot save the dict key {key!r} at {where}: keys must be int or str")


def _encode(node: object, tensors: dict[str, torch.Tensor], where: str) -> Any:
    if isinstance(node, torch.Tensor):
        key = f"{len(tensors)}:{where}"  # the index keeps keys unique whatever the names hold
        tensors[key] = node.detach().to("cpu", memory_format=torch.contiguous_format, copy=True)
        return {"t": key}
    if isinstance(node, dict):
        return {
            "d": [
                [_encode_key(k, where), _encode(v, tensors, f"{where}.{k}")]
                for k, v in node.items()
            ]
        }
    if isinstance(node, (list, tuple)):
        kind = "l" if isinstance(node, list) else "u"
        return {kind: [_encode(v, tensors, f"{where}.{i}") for i, v in enumerate(node)]}
    if isinstance(node, float) and not math.isfinite(node):
        return {"f": repr(node)}
    if node is None or isinstance(node, (bool, int, float, str)):
        return {"v": node}
    raise TypeError(
        f"cannot save a {type(node).__name__} at {where}: a tree holds dicts, lists, tuples, "
        "tensors, and int, float, str, bool or None"
    )


def _decode(node: Any, tensors: dict[str, torch.Tensor], path: Path) -> Any:
    if not isinstance(node, dict) or len(node) != 1:
        raise ValueError(f"{path}: the tree metadata is corrupt (bad node {node!r:.80})")
    ((kind, value),) = node.items()
    if kind == "t":
        return tensors[value]
    if kind == "d":
        return {(k["i"] if isinstance(k, dict) else k): _decode(v, tensors, path) for k, v in value}
    if kind == "l":
        return [_decode(v, tensors, path) for v in value]
    if kind == "u":
        return tuple(_decode(v, tensors, path) for v in value)
    if kind == "f":
        return float(value)
    if kind == "v":
        return value
    raise ValueError(f"{path}: the tree metadata is corrupt (unknown node kind {kind!r})")


def save_tree(path: Path, tree: Any) -> None:
    """Save a tree of tensors and JSON scalars as one safetensors file.

    Tensors are saved from the CPU; their dtype, shape and values come back exactly.

    Args:
        path: The file to write (conventionally ending in `.safetensors`).
        tree: Nested dicts (int or str keys), lists and tuples of tensors, int, float, str,
            bool and None.

    Raises:
        TypeError: The tree holds something else.
    """
    tensors: dict[str, torch.Tensor] = {}
    structure = _encode(tree, tensors, "root")
    metadata = {STRUCTURE_KEY: json.dumps(structure, allow_nan=False)}
    safetensors.torch.save_file(tensors, str(path), metadata=metadata)


def load_tree(path: Path, device: torch.device | str | None = None) -> Any:
    """Load a tree that `save_tree` saved.

    Args:
        path: The file `save_tree` wrote.
        device: Where to put the tensors (None: the CPU).

    Returns:
        The tree, with the same containers, key types and scalars.

    Raises:
        ValueError: The file is a safetensors file that `save_tree` did not write.
    """
    with safe_open(str(path), framework="pt", device=str(device or "cpu")) as file:
        metadata = file.metadata() or {}
        tensors = {key: file.get_tensor(key) for key in file.keys()}  # noqa: SIM118
    if STRUCTURE_KEY not in metadata:
        raise ValueError(
            f"{path} holds no tree structure (no {STRUCTURE_KEY!r} metadata); it was not written "
            "by save_tree"
        )
    return _decode(json.loads(metadata[STRUCTURE_KEY]), tensors, path)
