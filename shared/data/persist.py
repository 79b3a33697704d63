"""A buffer's samples saved as one safetensors file, without pickle.

Samples that are tensors of one dtype and shape, or mappings of the same names to such tensors
(what the experience plane stores), are saved stacked: one tensor per name, the sample count
and the names in the file's metadata. Samples whose shapes vary (a name's tensors of one dtype
and rank, lengths differing from sample to sample) are saved flat: per name, every sample's
elements one after another and a tensor of their shapes, so the file's header stays small
however many samples there are (safetensors refuses a header over 100 MB, one entry a tensor).
Any other samples (trees of tensors and JSON scalars) go through
`shared.torch.state_io.save_tree`. Loading gives the samples back in order, as views of the
loaded tensors.

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
SHAPES = ".shapes"  # beside a flat column's key: its samples' shapes


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
    kind, names, tensors, ragged = stacked
    info = {"kind": kind, "count": len(samples), "names": names, "ragged": ragged}
    metadata = {FORMAT_KEY: json.dumps(info)}
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
        keys = [str(i) for i in range(max(1, len(names)))]
        if info.get("ragged"):
            columns = [_unflattened(tensors[k], tensors[f"{k}{SHAPES}"]) for k in keys]
        else:
            columns = [tensors[k].unbind(0) for k in keys]
    except (ValueError, TypeError, KeyError, RuntimeError) as exc:
        raise ValueError(f"{path}: the samples' metadata is corrupt ({exc})") from None
    if any(len(column) != count for column in columns):
        raise ValueError(f"{path}: its tensors do not all hold {count} samples")
    if kind == TENSORS:
        return list(columns[0])
    return [
        {name: column[i] for name, column in zip(names, columns, strict=True)} for i in range(count)
    ]


def _stacked(
    samples: Sequence[Any],
) -> tuple[str, list[str], dict[str, torch.Tensor], bool] | None:
    """(kind, names, tensors by column key, whether flat) when the samples are tensors, or
    mappings of the same names to tensors, each name's of one dtype and rank; else None."""
    import torch

    if not samples:
        return None
    first = samples[0]
    if isinstance(first, torch.Tensor):
        kind, names, columns = TENSORS, [], [list(samples)]
    elif isinstance(first, Mapping) and all(isinstance(k, str) for k in first):
        kind, names = MAPPINGS, list(first)
        if not names or any(
            not isinstance(sample, Mapping) or list(sample) != names for sample in samples
        ):
            return None
        columns = [[sample[n] for sample in samples] for n in names]
    else:
        return None
    if not all(_of_a_kind(column) for column in columns):
        return None
    if all(all(t.shape == column[0].shape for t in column) for column in columns):
        return kind, names, {str(i): _stack(c) for i, c in enumerate(columns)}, False
    tensors: dict[str, torch.Tensor] = {}
    for i, column in enumerate(columns):
        tensors[str(i)], tensors[f"{i}{SHAPES}"] = _flattened(column)
    return kind, names, tensors, True


def _of_a_kind(column: Sequence[object]) -> bool:
    """Whether every value is a tensor of the first one's dtype and rank."""
    import torch

    first = column[0]
    return isinstance(first, torch.Tensor) and all(
        isinstance(t, torch.Tensor) and t.dtype == first.dtype and t.dim() == first.dim()
        for t in column
    )


def _stack(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    import torch

    return torch.stack([t.detach().to("cpu") for t in tensors]).contiguous()


def _flattened(tensors: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Every tensor's elements one after another, and their shapes (count x rank, int64)."""
    import torch

    values = torch.cat([t.detach().to("cpu").reshape(-1) for t in tensors])
    shapes = torch.tensor([list(t.shape) for t in tensors], dtype=torch.int64)
    return values, shapes.reshape(len(tensors), tensors[0].dim())


def _unflattened(values: torch.Tensor, shapes: torch.Tensor) -> list[torch.Tensor]:
    """The tensors `_flattened` laid out, as views of `values`."""
    import torch

    if values.dim() != 1 or shapes.dim() != 2 or bool((shapes < 0).any()):
        raise ValueError("the flat samples or their shapes are malformed")
    sizes = shapes.prod(dim=1).tolist()
    if sum(sizes) != values.numel():
        raise ValueError(f"the shapes name {sum(sizes)} elements, the values hold {values.numel()}")
    rows = shapes.tolist()
    parts = torch.split(values, sizes)
    return [part.view(row) for part, row in zip(parts, rows, strict=True)]
