"""Save nested state (optimizer and scheduler state dicts) as one safetensors file, no pickle.

Tensors go in the file's tensor area under flattened keys; the structure around them (dicts,
lists, tuples, JSON scalars, int keys, inf/nan) goes as JSON in the file's `__metadata__`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from safetensors import safe_open

STRUCTURE_KEY = "structure"


def _encode(node: Any, tensors: dict[str, torch.Tensor], path: str) -> Any:
    if isinstance(node, torch.Tensor):
        key = f"{len(tensors)}:{path}"  # the index keeps keys unique whatever the names
        tensors[key] = node.detach().to("cpu").contiguous().clone()
        return {"t": key}
    if isinstance(node, dict):
        items = [
            [_encode_key(k), _encode(v, tensors, f"{path}.{k}" if path else str(k))]
            for k, v in node.items()
        ]
        return {"d": items}
    if isinstance(node, (list, tuple)):
        values = [
            _encode(v, tensors, f"{path}.{i}" if path else str(i)) for i, v in enumerate(node)
        ]
        return {"l" if isinstance(node, list) else "u": values}
    if isinstance(node, float) and not math.isfinite(node):
        return {"f": repr(node)}
    if node is None or isinstance(node, (bool, int, float, str)):
        return {"v": node}
    raise TypeError(f"cannot save a {type(node).__name__} at {path or 'the root'}")


def _encode_key(key: Any) -> Any:
    if isinstance(key, bool) or not isinstance(key, (int, str)):
        raise TypeError(f"dict keys must be int or str, not {type(key).__name__}")
    return {"i": key} if isinstance(key, int) else key


def _decode(node: Any, tensors: dict[str, torch.Tensor]) -> Any:
    ((kind, value),) = node.items()
    if kind == "t":
        return tensors[value]
    if kind == "d":
        return {(k["i"] if isinstance(k, dict) else k): _decode(v, tensors) for k, v in value}
    if kind == "l":
        return [_decode(v, tensors) for v in value]
    if kind == "u":
        return tuple(_decode(v, tensors) for v in value)
    if kind == "f":
        return float(value)
    return value


def save_tree(path: Path, tree: Any) -> None:
    tensors: dict[str, torch.Tensor] = {}
    structure = _encode(tree, tensors, "")
    safetensors.torch.save_file(tensors, str(path), metadata={STRUCTURE_KEY: json.dumps(structure)})


def load_tree(path: Path, device: torch.device | str | None = None) -> Any:
    with safe_open(str(path), framework="pt", device=str(device or "cpu")) as file:
        metadata = file.metadata() or {}
        tensors = {key: file.get_tensor(key) for key in file.keys()}  # noqa: SIM118
    if STRUCTURE_KEY not in metadata:
        raise ValueError(f"{path} was not written by save_tree (no structure metadata)")
    return _decode(json.loads(metadata[STRUCTURE_KEY]), tensors)
