"""Data-parallel training in the trainer tier: torchrun starts two ranks (gloo, CPU); they train
in lockstep, rank 0 alone pushes and checkpoints, and the served weights are the checkpoint's.
Rank 0 tells the others how each sync went: they go on alike when it failed, and all stop when
rank 0 is fenced."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
from pathlib import Path

import safetensors.torch

from devtools.launch import ROOT, trainer_command
from shared.gen.weightsync.v1 import weightsync_pb2 as pb
from shared.weights.digest import state_digest
from tests.integration.conftest import Services, wait_until

QUICKSTART = "examples.quickstart:app"


def trainer_args(tmp_path: Path, target: str, *args: str) -> list[str]:
    """What every rank runs after the interpreter (devtools/launch.py `trainer_command`): the
    trainer service pushing to `target`."""
    return trainer_command(
        QUICKSTART, [target], "--trainer-id", "dp", "--metrics-listen", "127.0.0.1:0",
        "--state-dir", str(tmp_path / "trainer"), *args,
    )[1:]  # fmt: skip


def torchrun(
    services: Services, tmp_path: Path, target: str, *args: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            str(Path(sys.executable).parent / "torchrun"),
            "--standalone",
            "--nproc-per-node",
            "2",
            *trainer_args(tmp_path, target, *args),
        ],
        cwd=ROOT,
        env={**services.env, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=240,
    )


def assert_group_freed(stderr: str) -> None:
    """Each rank freed its process group before exit. Adam pulls in a module that, imported
    after the group was joined, held it past destroy_process_group(); its gloo threads then
    ran into interpreter exit, where rank 1 sometimes aborted after a clean run."""
    assert "still referenced after it was destroyed" not in stderr, stderr
    assert stderr.count("left the process group") == 2, stderr


def test_two_ranks_train_in_lockstep_and_rank_zero_alone_pushes(
    services: Services, tmp_path: Path
) -> None:
    inference = services.inference(QUICKSTART)
    run = torchrun(services, tmp_path, inference.sync, "--max-runs", "4", "--checkpoint-every", "2")
    assert run.returncode == 0, run.stdout + run.stderr
    assert_group_freed(run.stderr)
    # Checkpoints after runs 2 and 4 and on exit each checked that both ranks agree.
    assert run.stderr.count("all 2 ranks hold identical weights") == 2 * 3, run.stderr
    state = inference.model_state("quickstart")
    # The catch-up sync and one per run (a sync that timed out on a loaded machine spends a
    # version number). Had rank 1 pushed too, one rank would have fenced the other (exit 3).
    assert state.version >= 5 and (state.writer_id, state.lease_holder) == ("dp", "dp")
    trained = safetensors.torch.load_file(
        tmp_path / "trainer" / "checkpoint" / "models" / "quickstart.safetensors"
    )
    assert state.digest == state_digest(trained)

    # A second launch resumes both ranks from rank 0's checkpoint and carries on the versions.
    again = torchrun(services, tmp_path, inference.sync, "--max-runs", "1")
    assert again.returncode == 0, again.stdout + again.stderr
    assert_group_freed(again.stderr)
    assert inference.model_state("quickstart").version >= state.version + 2


def ranks(services: Services, target: str, *args: str) -> list[subprocess.Popen[bytes]]:
    """Two ranks started as torchrun would start them, each with its own exit code and log
    (`rank0`, `rank1`)."""
    with socket.create_server(("127.0.0.1", 0)) as probe:  # a free port for rank 0's store
        port = probe.getsockname()[1]
    command = [sys.executable, *trainer_args(services.directory, target, *args)]
    group = {"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1"}
    group |= {"MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
    return [
        services.spawn(
            command, f"rank{rank}", env={**group, "RANK": f"{rank}", "LOCAL_RANK": f"{rank}"}
        )
        for rank in (0, 1)
    ]


def test_ranks_act_together_on_a_failed_sync_and_stop_together_when_fenced(
    services: Services,
) -> None:
    inference = services.inference(QUICKSTART)
    group = ranks(
        services, inference.sync, "--run-interval", "0.2", "--checkpoint-every", "1",
        "--connect-timeout", "0.5",
    )  # fmt: skip

    def log(rank: int) -> str:
        return services.log(f"rank{rank}")

    def running() -> bool:
        assert all(p.poll() is None for p in group), log(0) + log(1)
        return True

    wait_until(lambda: running() and inference.model_state("quickstart").version >= 3)
    # No inference service left: rank 0's syncs fail. Every rank still tears each run down, so
    # the optimizers stay alike and the weights with them, which every checkpoint checks.
    inference.process.send_signal(signal.SIGKILL)
    inference.process.wait(timeout=10)
    wait_until(lambda: running() and log(0).count("sync failed, will catch up next run") >= 2)
    checked = log(0).count("all 2 ranks hold identical weights")
    wait_until(
        lambda: running() and log(0).count("all 2 ranks hold identical weights") >= checked + 2
    )

    back = services.inference(
        QUICKSTART, "--sync-listen", inference.sync, name="back"
    )  # it lost the lease: the trainer acquires it again
    wait_until(lambda: running() and back.model_state("quickstart").version > 0)
    assert back.model_state("quickstart").lease_holder == "dp"
    # Another trainer takes the model over: rank 0's next push is fenced, and both ranks stop.
    request = pb.AcquireWriterRequest(model_name="quickstart", writer_id="usurper")
    back.sync_stub().AcquireWriter(request, timeout=10)
    assert [p.wait(timeout=60) for p in group] == [3, 3], log(0) + log(1)
    for rank in (0, 1):
        assert "stopping:" in log(rank) and "another trainer has taken" in log(rank)
        assert "left the process group" in log(rank)
    assert back.model_state("quickstart").lease_holder == "usurper"
    assert "sync failed, will catch up next run: rank 0's sync failed" in log(1)
