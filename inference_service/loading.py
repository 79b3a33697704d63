"""Build the served models from the user's app: inference copies only, never a training copy."""

from __future__ import annotations

import logging
from typing import Any

import torch

from inference_service.dataplane.model_io import empty_like_spec
from inference_service.served_model import ServedModel
from shared.app import App
from shared.errors import ConfigurationError
from shared.torch.build import build_torch_model, overriding_device
from shared.torch.model import default_infer_procedure
from shared.weights.served import serve_module

logger = logging.getLogger(__name__)


def load_models(app: App, device: torch.device) -> dict[str, ServedModel]:
    """Build every model that has an inference copy, warm it up, and return them by name.

    Each model's factory builds a TorchTrainingModel; its module becomes the served copy as is
    (no deepcopy), and the TrainingModel wrapper is dropped. Training-only models are skipped.
    """
    served: dict[str, ServedModel] = {}
    for spec in app.models.values():
        training_model = build_torch_model(spec.name, spec.build)
        if not training_model.has_inference_model:
            logger.info("model %s is training-only; not served here", spec.name)
            continue
        if not spec.inputs or not spec.outputs:
            raise ConfigurationError(
                f"model {spec.name!r} is served but declares no inputs or outputs; pass "
                "inputs=[TensorSpec(...)] and outputs=[...] to app.model()"
            )
        device = overriding_device(spec.name, training_model, device)
        module = serve_module(training_model.model, spec.served_dtype).to(device)
        procedure = training_model.inference_procedure
        if procedure is default_infer_procedure:
            # ServedModel.infer already moves the inputs to the model's device; skip the
            # default procedure's per-request search for that device.
            procedure = _call_module
        model = ServedModel(
            spec,
            module,
            procedure,
            accepts_pushes=not training_model.inference_thread_only,
            device=device,
        )
        del training_model
        warm_up(model)
        served[spec.name] = model
        logger.info(
            "model %s: serving %s on %s (%d tensors)",
            spec.name,
            "its pretrained weights" if not model.accepts_pushes else "version 0",
            device,
            len(model.layout),
        )
    return served


def _call_module(module: torch.nn.Module, *inputs: torch.Tensor) -> Any:
    return module(*inputs)


def warm_up(model: ServedModel) -> None:
    """Run one request of batch 1 (each -1 dimension as 1) so the first client does not pay."""
    inputs = [
        empty_like_spec(spec, [1 if d == -1 else d for d in spec.shape])
        for spec in model.spec.inputs
    ]
    try:
        model.infer(inputs)
    except Exception as exc:
        raise ConfigurationError(
            f"model {model.name!r} failed its warm-up request on zero inputs of shapes "
            f"{[list(t.shape) for t in inputs]}: {type(exc).__name__}: {exc}"
        ) from exc
