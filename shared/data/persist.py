"""A buffer's samples saved as one safetensors file, without pickle.

Samples that are tensors of one dtype and shape, or mappings of the same names to such tensors
(what the experience plane stores), are saved stacked: one tensor per name, the sample count
and the names in the file's metadata. Any other samples (trees of tensors and JSON scalars) go
through `shared.torch.state_io.save_tree`. Loading gives the samples back in order, stacked ones
as views of the loaded tensors.

torch is imported on first use: the data API itself does not need it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

FORMAT_KEY = "weightsync.samples"
TENSORS = "tensors"  # every sample one tensor
MAPPINGS = "mappings"  # every sample a mapping of the same names to tensors


def state_file(path: Path) -> Path:
    """Where a buffer saved at `path` keeps its samples (`<path>.safetensors`)."""
    return path.parent / f"{path.name}.safetensors"


def save_samples(path: Path, samples: Sequence[Any]) -> None:
    """Save `samples` to the file `path`.

    Args:
        path: The file to write.
        samples: Tensors, mappings of names to tensors, or trees of tensors and JSON scalars.

    Raises:
        TypeError: A sample holds something a tree cannot (see `save_tree`).
    """
    import safetensors.torch

    from shared.torch.state_io import save_tree

    stacked = _stacked(samples)
    if stacked is None:
        save_tree(path, list(samples))
        return
    kind, names, tensors = stacked
    metadata = {FORMAT_KEY: json.dumps({"kind": kind, "count": len(samples), "names": names})}
    safetensors.torch.save_file(tensors, str(path), metadata=metadata)


def load_samples(path: Path) -> list[Any]:
    """The samples `save_samples` saved to `path`, in order.

    Raises:
        ValueError: The file was not written by `save_samples`.
    """
    from safetensors import safe_open

    from shared.torch.state_io import load_tree

    with safe_open(str(path), framework="pt", device="cpu") as file:
        metadata = file.metadata() or {}
        stacked = FORMAT_KEY in metadata
        tensors = {key: file.get_tensor(key) for key in file.keys()} if stacked else {}  # noqa: SIM118
    if not stacked:
        tree = load_tree(path)
        if not isinstance(tree, list):
            raise ValueError(f"{path} holds a {type(tree).__name__}, not a list of samples")
        return tree
    try:
        info = json.loads(metadata[FORMAT_KEY])
        count, names, kind = int(info["count"]), [str(n) for n in info["names"]], info["kind"]
        columns = [tensors[str(i)].unbind(0) for i in range(max(1, len(names)))]
    except (ValueError, TypeError, KeyError) as exc:
        raise ValueError(f"{path}: the samples' metadata is corrupt ({exc})") from None
    if any(len(column) != count for column in columns):
        raise ValueError(f"{path}: its tensors do not all hold {count} samples")
    if kind == TENSORS:
        return list(columns[0])
    return [
        {name: column[i] for name, column in zip(names, columns, strict=True)} for i in range(count)
    ]


def _stacked(samples: Sequence[Any]) -> tuple[str, list[str], dict[str, torch.Tensor]] | None:
    """(kind, names, tensors by column index) when the samples stack; else None."""
    import torch

    if not samples:
        return None
    first = samples[0]
    if isinstance(first, torch.Tensor):
        if all(_like(s, first) for s in samples):
            return TENSORS, [], {"0": _stack(samples)}
        return None
    if not isinstance(first, Mapping) or not all(isinstance(k, str) for k in first):
        return None
    names = list(first)
    if not names or not all(isinstance(first[n], torch.Tensor) for n in names):
        return None
    for sample in samples:
        if not isinstance(sample, Mapping) or list(sample) != names:
            return None
        if not all(_like(sample[n], first[n]) for n in names):
            return None
    columns = {str(i): _stack([s[n] for s in samples]) for i, n in enumerate(names)}
    return MAPPINGS, names, columns


def _like(value: object, model: torch.Tensor) -> bool:
    import torch

    return (
        isinstance(value, torch.Tensor)
        and value.dtype == model.dtype
        and value.shape == model.shape
    )


def _stack(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    import torch

    return torch.stack([t.detach().to("cpu") for t in tensors]).contiguous()
