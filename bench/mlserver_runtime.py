"""The same torch MLP as bench/serve.py serves, as an MLServer custom runtime (its standard way
to serve a model it has no built-in runtime for). Runs inside MLServer's own environment."""

from __future__ import annotations

import os

import safetensors.torch
import torch
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse

from bench.mlp import MLP


class TorchMLP(MLModel):
    async def load(self) -> bool:
        self.model = MLP()
        self.model.load_state_dict(safetensors.torch.load_file(os.environ["BENCH_MLP_WEIGHTS"]))
        self.model.eval()
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        x = NumpyCodec.decode_input(payload.inputs[0])
        with torch.inference_mode():
            y = self.model(torch.from_numpy(x)).numpy()
        return InferenceResponse(model_name=self.name, outputs=[NumpyCodec.encode_output("y", y)])
