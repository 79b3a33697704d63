"""The app's models as both services build them: each factory called, what it returned checked.

Both services call every model factory of the app in their own process; a model they could not
sync or save is refused here, at start, with a line naming the model (ConfigurationError), and
each module is placed on the service's own device.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from shared.dtypes import BY_TORCH
from shared.errors import ConfigurationError
from shared.torch.model import TorchTrainingModel, placed_by_service, tensor_state

logger = logging.getLogger(__name__)


def overriding_device(
    name: str, model: TorchTrainingModel[Any], device: torch.device
) -> torch.device:
    """`device`, the service's, where model `name` goes; a warning is logged where its factory
    asked for another device (PAMIQ's `device`, which the service's `--device` overrides)."""
    asked = model.requested_device
    if asked is not None and (asked.type != device.type or asked.index not in (None, device.index)):
        logger.warning(
            "model %s: its factory asked for device %s; this service's --device puts it on %s",
            name,
            asked,
            device,
        )
    return device


def build_torch_model(name: str, factory: Callable[[], object]) -> TorchTrainingModel[nn.Module]:
    """Call a model factory of the app; the services sync TorchTrainingModels only.

    Raises:
        ConfigurationError: The factory raised (a missing or mismatched
            `pretrained_parameter_file` among others), returned something else, or a model with
            an inference copy holds a tensor whose dtype cannot travel; the message names the
            model (and the tensor), or the module's state dict holds something other than
            tensors (a module's extra state).
    """
    try:
        with placed_by_service():  # on this service's --device, after (overriding_device)
            model = factory()
    except Exception as exc:
        raise ConfigurationError(
            f"model {name!r}: its factory raised {type(exc).__name__}: {exc}"
        ) from exc
    if not isinstance(model, TorchTrainingModel):
        raise ConfigurationError(
            f"model {name!r}: the factory returned a {type(model).__name__}; syncing across "
            "machines needs a TorchTrainingModel"
        )
    try:
        state = tensor_state(model.model, name)
    except TypeError as exc:
        raise ConfigurationError(str(exc)) from None
    if model.has_inference_model:
        for tensor_name, tensor in state.items():
            if tensor.dtype not in BY_TORCH:
                raise ConfigurationError(
                    f"model {name!r}: tensor {tensor_name!r} is {tensor.dtype}, which cannot "
                    "travel in safetensors framing; weights may be "
                    f"{', '.join(str(d) for d in BY_TORCH)}"
                )
    return model
