"""Review: data-parallel trainers (torchrun / env:// ranks) as a careless user would run them.

The module is also the app both services import (`tests.integration.test_review_ranks:<app>`):
its trainers read RANK, which torchrun sets, so each rank can be made to behave differently.
Environment variables: TEST_SLOW_BUILD_RANK (the rank whose model factory takes 3 s),
TEST_HANG_RANK (the rank whose train() hangs on its 2nd run).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import safetensors.torch
import torch
from torch import nn
from typing_extensions import override

from devtools.launch import ROOT, trainer_command
from shared import App, TensorSpec, TorchTrainer, TorchTrainingModel
from shared.torch.trainer import OptimizersSetup
from shared.weights.digest import state_digest
from tests.integration.conftest import Services, wait_until
from tests.integration.training_apps import Net  # Linear + BatchNorm1d (buffers)

INPUTS = [TensorSpec("x", "FP32", (-1, 4))]
OUTPUTS = [TensorSpec("y", "FP32", (-1, 4))]


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


class PlainNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(4, 4)

    @override
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.lin(x)
        return out


class ShardTrainer(TorchTrainer):
    """Two SGD steps per run on this rank's own shard of data (as data-parallel training is
    meant to be used: each rank its own data)."""

    runs = 0

    @override
    def on_training_models_attached(self) -> None:
        super().on_training_models_attached()
        self.net = self.get_torch_training_model("net", nn.Module)

    @override
    def create_optimizers(self) -> OptimizersSetup:
        return {"sgd": torch.optim.SGD(self.net.model.parameters(), lr=0.01)}

    @override
    def train(self) -> None:
        self.runs += 1
        if os.environ.get("TEST_HANG_RANK") == str(_rank()) and self.runs == 2:
            time.sleep(3600)  # a rank stuck in user code (waiting for data that never comes)
        g = torch.Generator().manual_seed(1000 * _rank() + self.runs)
        for _ in range(2):
            x = torch.randn(32, 4, generator=g) * (1 + _rank())
            loss = (self.net.model(x) - 1).pow(2).mean()
            self.optimizers["sgd"].zero_grad()
            loss.backward()
            self.optimizers["sgd"].step()


def _build(module: type[nn.Module]) -> TorchTrainingModel[nn.Module]:
    if os.environ.get("TEST_SLOW_BUILD_RANK") == str(_rank()):
        time.sleep(3)  # a rank that builds its model slowly (a slower disk, a busier host)
    return TorchTrainingModel(module())


bn = App()
bn.add_model("net", lambda: _build(Net), inputs=INPUTS, outputs=OUTPUTS)
bn.add_trainer("shard", ShardTrainer)


plain = App()
plain.add_model("net", lambda: _build(PlainNet), inputs=INPUTS, outputs=OUTPUTS)
plain.add_trainer("shard", ShardTrainer)


# ---------------------------------------------------------------------------------------------
# The tests. Two ranks on CPU (gloo), started by torchrun as docs/deploy.md shows.

HERE = "tests.integration.test_review_ranks"
TORCHRUN_TIMEOUT_S = 40


def torchrun(
    services: Services, app: str, target: str, state_dir: Path, *args: str, **env: str
) -> subprocess.CompletedProcess[str]:
    """`torchrun --standalone --nproc-per-node 2 -m trainer_service ...` (docs/deploy.md)."""
    command = trainer_command(
        f"{HERE}:{app}", [target], "--trainer-id", "dp", "--metrics-listen", "127.0.0.1:0",
        "--state-dir", str(state_dir), *args,
    )[1:]  # fmt: skip
    process = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "torchrun"),
            "--standalone",
            "--nproc-per-node",
            "2",
            *command,
        ],
        cwd=ROOT,
        env={**services.env, "OMP_NUM_THREADS": "1", **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # so that a hung run is killed with its ranks, none left over
    )
    try:
        out, err = process.communicate(timeout=TORCHRUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        out, err = process.communicate()
        message = f"torchrun still running after {TORCHRUN_TIMEOUT_S} s: {err[-2000:]}"
        raise AssertionError(message) from None
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def test_batchnorm_model_trains_data_parallel_on_each_ranks_own_data(
    services: Services, tmp_path: Path
) -> None:
    """docs/deploy.md: "Every rank builds the same models and runs the same trainers on its own
    data ... the weights stay bit-identical". A model with BatchNorm (running stats are buffers
    that forward updates from each rank's own batch) is the most common kind there is; DDP keeps
    such buffers alike (broadcast_buffers). Here every rank keeps its own running stats, so the
    first checkpoint finds the ranks "diverged" and every rank dies (exit 1, a traceback),
    without ever writing a checkpoint."""
    inference = services.inference(f"{HERE}:bn")
    run = torchrun(
        services, "bn", inference.sync, tmp_path / "trainer", "--max-runs", "4",
        "--checkpoint-every", "2",
    )  # fmt: skip
    assert "RanksDivergedError" not in run.stderr, run.stderr[-3000:]
    assert run.returncode == 0, run.stderr[-3000:]
    trained = safetensors.torch.load_file(
        tmp_path / "trainer" / "checkpoint" / "models" / "net.safetensors"
    )
    assert inference.model_state("net").digest == state_digest(trained)


def test_ready_file_under_torchrun_names_the_rank_that_serves_metrics(
    services: Services, tmp_path: Path
) -> None:
    """Under torchrun every rank gets the same flags, so every rank writes the same --ready-file
    (docs/configuration.md: "write the pid and the experience plane's bound port here as JSON",
    with the metrics port; devtools/launch.py reads it to find a trainer). Only rank 0 serves
    metrics, yet the last rank to write wins: when rank 1 gets there last (its model took longer
    to build), the file names rank 1's pid and `"metrics_port": null` although metrics are
    served."""
    inference = services.inference(f"{HERE}:plain")
    ready = tmp_path / "ready.json"
    run = torchrun(
        services, "plain", inference.sync, tmp_path / "trainer", "--max-runs", "2",
        "--ready-file", str(ready), TEST_SLOW_BUILD_RANK="1",
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert "metrics on port" in run.stderr
    served_port = int(run.stderr.split("metrics on port ")[1].split()[0])
    info = json.loads(ready.read_text())
    assert info["metrics_port"] == served_port, info


def manual_ranks(
    services: Services,
    app: str | list[str],
    target: str,
    state_dir: Path,
    extra: tuple[str, ...] = (),
    **env: str,
) -> list[subprocess.Popen[bytes]]:
    """Two ranks started as torchrun would start them (RANK, WORLD_SIZE, MASTER_*), each with
    its own exit code and log (`rank0`, `rank1`), as tests/integration/test_distributed.py does;
    `app`: one for both, or each rank's; `extra`: more flags for both."""
    with socket.create_server(("127.0.0.1", 0)) as probe:  # a free port for rank 0's store
        port = probe.getsockname()[1]
    apps = [app, app] if isinstance(app, str) else app
    group = {"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1"}
    group |= {"MASTER_PORT": str(port), "OMP_NUM_THREADS": "1", **env}
    return [
        services.spawn(
            trainer_command(
                apps[r],
                [target],
                "--trainer-id",
                "dp",
                "--metrics-listen",
                "127.0.0.1:0",
                "--state-dir",
                str(state_dir),
                *extra,
            ),
            f"rank{r}",
            env={**group, "RANK": f"{r}", "LOCAL_RANK": f"{r}"},
        )
        for r in (0, 1)
    ]


def test_second_sigterm_ends_a_rank_stuck_waiting_for_another(services: Services) -> None:
    """The trainer's own log line on SIGTERM: "stopping after the run in progress and a
    checkpoint (another SIGTERM stops at once, without a checkpoint)" (shared/process.py
    `watch_stop_signals`: "a second ends the process at once"). Rank 1's train() hangs in user
    code; rank 0 waits in the gradient all-reduce. Rank 0 then ignores SIGTERM altogether, a second
    one too: no log line, no exit; its Python handler never runs while it waits in gloo, and
    gloo's own timeout is 30 minutes. Only SIGKILL ends it (docker stop's, 30 s later)."""
    app = f"{HERE}:plain"
    inference = services.inference(app)
    ranks = manual_ranks(
        services, app, inference.sync, services.directory / "trainer", TEST_HANG_RANK="1"
    )
    # Run 1 is pushed (catch-up, then run 1); run 2 hangs on rank 1.
    wait_until(lambda: inference.model_state("net").version >= 2, timeout=30)
    time.sleep(1.0)
    assert ranks[0].poll() is None, services.log("rank0")
    ranks[0].send_signal(signal.SIGTERM)
    time.sleep(1.0)
    ranks[0].send_signal(signal.SIGTERM)
    try:
        code = ranks[0].wait(timeout=10)
    except subprocess.TimeoutExpired:
        code = None
    finally:
        for rank in ranks:
            if rank.poll() is None:
                rank.kill()
    log = services.log("rank0")
    assert "SIGTERM" in log, "rank 0 did not even log the SIGTERM: " + log[-1500:]
    assert code == 128 + signal.SIGTERM, f"rank 0 still running 10 s after a second SIGTERM: {code}"


def test_ranks_built_from_different_apps_fail_with_a_message(services: Services) -> None:
    """A careless multi-node deployment: node 2 still runs the previous version of the app (a
    model without BatchNorm there, with it here). DDP checks the ranks' parameter shapes at
    start and fails naming the mismatch; docs/deploy.md promises the ranks stop with an error if
    their weights ever differ. Here both ranks hang at start, silently (rank 0 issues fewer
    broadcasts than rank 1 waits for), for gloo's 30-minute timeout, nothing pushed."""
    inference = services.inference(f"{HERE}:plain")
    ranks = manual_ranks(
        services, [f"{HERE}:plain", f"{HERE}:bn"], inference.sync, services.directory / "t"
    )
    codes: list[int | None] = []
    deadline = time.monotonic() + 20
    try:
        for rank in ranks:
            try:
                codes.append(rank.wait(timeout=max(0.1, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                codes.append(None)
    finally:
        for rank in ranks:
            if rank.poll() is None:
                rank.kill()
    logs = services.log("rank0") + services.log("rank1")
    assert None not in codes, f"ranks still running after 20 s ({codes}): " + logs[-2000:]
    assert all(code != 0 for code in codes), logs[-2000:]


def test_trainer_groups_under_torchrun_stop_every_rank_at_start(services: Services) -> None:
    """--trainer-groups splits trainers between replicas, which data-parallel ranks are not:
    every rank refuses it at start (exit 2, naming the flag). Rank 0 used to take it and then
    wait on the others, which had refused it, until gloo's timeout."""
    app = f"{HERE}:plain"
    inference = services.inference(app)
    ranks = manual_ranks(
        services,
        app,
        inference.sync,
        services.directory / "trainer",
        ("--trainer-groups", "shard"),
    )
    try:
        codes = [rank.wait(timeout=60) for rank in ranks]
    finally:
        for rank in ranks:
            if rank.poll() is None:
                rank.kill()
    for r, code in enumerate(codes):
        log = services.log(f"rank{r}")
        assert code == 2 and "--trainer-groups cannot split data-parallel ranks" in log, log
