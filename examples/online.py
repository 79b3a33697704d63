"""Online learning from what an agent experiences: the model learns only from the agent's data.

An agent (examples/agent.py) acts in a small environment whose rule shifts over time: it asks
the served model `online` for its prediction of y at points x, then sees the true y, and streams
each (x, y) it saw to the trainer's buffer `experience` with a RemoteDataCollector. The trainer
trains only once enough new samples arrived (PAMIQ's training conditions), on the newest ones
the buffer keeps, and the trainer service pushes the new weights after each run: the agent's
error falls, jumps when the environment shifts, and falls again.

    inference-service --models examples.online:app
    trainer-service --models examples.online:app
    python examples/agent.py --inference 127.0.0.1:8001 --trainer 127.0.0.1:8201
"""

from __future__ import annotations

import torch
from torch import nn
from typing_extensions import override

from examples.quickstart import SineNet
from shared import App, DictSequentialBuffer, TensorSpec, TorchTrainer, TorchTrainingModel
from shared.torch.trainer import OptimizersSetup

BUFFER = "experience"
# The newest samples the buffer keeps: old enough to fit a shape, young enough to forget a rule
# the environment has left.
KEEP = 1024
# A run trains once this many new samples arrived since the last one.
NEW_SAMPLES = 128

app = App()


@app.model(
    "online",
    inputs=[TensorSpec("x", "FP32", (-1, 1))],
    outputs=[TensorSpec("y", "FP32", (-1, 1))],
)
def online() -> TorchTrainingModel[SineNet]:
    return TorchTrainingModel(SineNet())


app.add_buffer(
    BUFFER,
    lambda: DictSequentialBuffer[torch.Tensor](["x", "y"], KEEP),
    tensors=[TensorSpec("x", "FP32", (1,)), TensorSpec("y", "FP32", (1,))],
)


class OnlineTrainer(TorchTrainer):
    """Each run: `steps` Adam steps on minibatches of what the agent saw most recently."""

    def __init__(self, steps: int = 40, batch_size: int = 64) -> None:
        super().__init__(BUFFER, min_buffer_size=NEW_SAMPLES, min_new_data_count=NEW_SAMPLES)
        self.steps = steps
        self.batch_size = batch_size

    @override
    def on_training_models_attached(self) -> None:
        self.model = self.get_torch_training_model("online", SineNet)

    @override
    def on_data_users_attached(self) -> None:
        self.experience = self.get_data_user(BUFFER)

    @override
    def create_optimizers(self) -> OptimizersSetup:
        return {"adam": torch.optim.Adam(self.model.model.parameters(), lr=3e-3)}

    @override
    def train(self) -> None:
        data = self.experience.get_data()
        device = next(self.model.model.parameters()).device
        x = torch.stack(data["x"]).to(device)
        y = torch.stack(data["y"]).to(device)
        optimizer = self.optimizers["adam"]
        for _ in range(self.steps):
            pick = torch.randint(len(x), (min(self.batch_size, len(x)),), device=device)
            loss = nn.functional.mse_loss(self.model(x[pick]), y[pick])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()


app.add_trainer("online", OnlineTrainer)
