"""A torch model's state on disk: save_state / load_state (safetensors, bit-exact, strict) and the
pretrained parameter file (safetensors, or a torch file loaded without unpickling objects)."""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import pytest
import safetensors.torch
import torch
from torch import nn

from shared.torch import TorchTrainingModel
from tests.unit.shared.torch.modules import CustomModel


def test_save_and_load_state_round_trip_bit_exactly(tmp_path: Path, device: torch.device) -> None:
    model = TorchTrainingModel(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)), device=device)
    model.model(torch.randn(8, 3, device=device))  # moves the running statistics
    saved = {k: v.clone() for k, v in model.model.state_dict().items()}
    model.save_state(tmp_path / "model_params")
    assert [p.name for p in tmp_path.iterdir()] == ["model_params.safetensors"]
    assert safetensors.torch.load_file(tmp_path / "model_params.safetensors").keys() == saved.keys()
    with torch.no_grad():
        for tensor in model.model.state_dict().values():
            tensor.add_(1)
    model.load_state(tmp_path / "model_params")
    loaded = model.model.state_dict()
    assert list(loaded) == list(saved)
    for name, tensor in saved.items():
        assert loaded[name].device == device and loaded[name].dtype == tensor.dtype
        assert torch.equal(loaded[name], tensor), name


def test_load_state_is_strict_and_needs_the_file(tmp_path: Path) -> None:
    TorchTrainingModel(nn.Linear(3, 2, bias=False)).save_state(tmp_path / "m")
    with pytest.raises(RuntimeError, match=r'Missing key\(s\) in state_dict: "bias"'):
        TorchTrainingModel(nn.Linear(3, 2)).load_state(tmp_path / "m")
    with pytest.raises(
        FileNotFoundError,
        match=rf"^no saved model state at {re.escape(f'{tmp_path}/x.safetensors')}; "
        rf"save_state\({re.escape(f'{tmp_path}/x')}\) writes that file$",
    ):
        TorchTrainingModel(nn.Linear(3, 2)).load_state(tmp_path / "x")


def test_save_state_unties_shared_tensors_and_load_keeps_the_tie(tmp_path: Path) -> None:
    module = nn.Sequential(nn.Linear(3, 3, bias=False), nn.Linear(3, 3, bias=False))
    module[1].weight = module[0].weight
    weight = module[0].weight.detach().clone()
    model = TorchTrainingModel(module, has_inference_model=False)
    model.save_state(tmp_path / "tied")
    on_disk = safetensors.torch.load_file(tmp_path / "tied.safetensors")
    assert on_disk.keys() == {"0.weight", "1.weight"}
    assert torch.equal(on_disk["0.weight"], weight) and torch.equal(on_disk["1.weight"], weight)
    with torch.no_grad():
        module[0].weight.zero_()
    model.load_state(tmp_path / "tied")
    assert module[1].weight is module[0].weight
    assert torch.equal(module[0].weight, weight)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_pretrained_parameter_file(tmp_path: Path, suffix: str, device: torch.device) -> None:
    state = CustomModel().state_dict()
    path = tmp_path / f"params{suffix}"
    if suffix == ".pt":
        torch.save(state, path)
    else:
        safetensors.torch.save_file(state, path)
    model = TorchTrainingModel(CustomModel(), device=device, pretrained_parameter_file=path)
    for module in (model.model, model.inference_model._raw_model):
        assert module.linear.weight.device == device
        assert torch.equal(module.linear.weight.cpu(), state["linear.weight"])
        assert torch.equal(module.linear.bias.cpu(), state["linear.bias"])


class Payload:
    """Something a pickle could smuggle in."""


def test_pretrained_torch_file_never_unpickles_objects(tmp_path: Path) -> None:
    path = tmp_path / "params.pt"
    torch.save({**CustomModel().state_dict(), "payload": Payload()}, path)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        TorchTrainingModel(CustomModel(), pretrained_parameter_file=path)
