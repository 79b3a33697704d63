"""Outside review: the trainer service running a careless user's trainers.

Real processes, apps of tests/integration/training_apps.py: trainer groups that share a model,
a train() that raises, a trainer that syncs as soon as it has its model or half-way through
train(), a model with a lazy module, a trainer whose data never comes. Each test checks what a
user sees against the docs or PAMIQ-Core's semantics (/work/shared/research/pamiq_core.md).
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import safetensors.torch

from devtools.launch import NotReadyError
from shared.weights.digest import state_digest
from tests.integration.conftest import Services, wait_until
from tests.integration.training_apps import Net
from trainer_service.checkpoint import Checkpoints

APPS = "tests.integration.training_apps"


def exit_code(process: subprocess.Popen[bytes], timeout: float) -> int | None:
    """The process's exit status, or None if it still runs after `timeout` seconds."""
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return None


def test_trainer_groups_that_share_a_model_are_refused_at_start_naming_it(
    services: Services, tmp_path: Path
) -> None:
    """docs/deploy.md: "Models are assigned to trainers by trainer group ... Each process writes
    only the models its trainers use"; groups that share a buffer are refused at start (exit 2)
    because a split would break. Groups whose trainers train one model split that model between
    two writers: each replica's AcquireWriter fences the other (exit 3, and with a standby or a
    restart policy they take turns fencing each other). The split is known from the app at
    start, as for buffers: it should be refused there, naming the model."""
    app = f"{APPS}:shared_model"
    inference = services.inference(app)
    trainer = services.trainer(
        app,
        [inference],
        *("--trainer-groups", "a;b", "--state-dir", str(tmp_path / "state")),
        *("--run-interval", "1"),
    )
    code = exit_code(trainer, 20)
    log = services.log("trainer")
    assert code == 2, (
        f"exit status {code} (None: still running): it claimed a group sharing model 'net'\n"
        + log[-1200:]
    )
    assert "'net'" in log
    assert inference.model_state("net").version == 0  # nothing was pushed


@pytest.mark.parametrize("app", ["careless", "flaky_sync"])
def test_a_train_that_raises_still_leaves_a_checkpoint_of_the_runs_before(
    services: Services, tmp_path: Path, app: str
) -> None:
    """PAMIQ-Core: an exception in the training thread shuts the system down and launch()
    saves a final state after joining the threads (pamiq_core.md section 3). docs/sync.md: the
    trainer checkpoints "every --checkpoint-every runs ... (and at a graceful stop)"; the
    experience docs promise nothing acknowledged is lost at a stop. Here run 3's train()
    raises (`flaky_sync`: the model's own sync_impl raises at run 3's sync): the trainer
    service dies with a traceback and writes no checkpoint at all, so the two runs already
    served (and their optimizer state, and any acknowledged samples) are lost, and a restart
    pushes the app's initial weights over them."""
    app = f"{APPS}:{app}"
    inference = services.inference(app)
    services.env["TEST_RAISE_AT"] = "3" if app.endswith("careless") else "4"
    state = tmp_path / "trainer"
    trainer = services.trainer(app, [inference], "--state-dir", str(state), "--max-runs", "4")
    code = exit_code(trainer, 60)
    assert code is not None, services.log("trainer")
    assert inference.model_state("net").version >= 3  # runs 1 and 2 were served
    assert Checkpoints(state).current() is not None, (
        f"exit status {code} and no checkpoint in {state}: "
        f"{sorted(p.name for p in state.iterdir())}\n{services.log('trainer')[-1500:]}"
    )


def test_a_trainer_restarted_from_its_checkpoint_never_serves_the_apps_initial_weights(
    services: Services, tmp_path: Path
) -> None:
    """A trainer that syncs its model in on_training_models_attached (harmless in PAMIQ: a
    local swap, before launch() loads the saved state) makes the trainer service push the app's
    untrained factory weights as a new version at every restart, before it loads its
    checkpoint: clients are served the initial weights (a higher version number than the
    trained ones) until the checkpoint's weights are pushed after the resume. Versions only
    increase, but what they serve goes back to weights nobody trained."""
    app = f"{APPS}:eager"
    inference = services.inference(app)
    state = tmp_path / "trainer"
    first = services.trainer(app, [inference], "--state-dir", str(state), "--max-runs", "2")
    assert first.wait(timeout=60) == 0, services.log("trainer")
    trained = inference.model_state("net")
    initial = state_digest({k: v.contiguous() for k, v in Net().state_dict().items()})
    assert trained.digest != initial

    services.env["TEST_LOAD_SLEEP"] = "4"  # resuming takes a while (a large optimizer state)
    again = services.trainer(
        app, [inference], "--state-dir", str(state), "--max-runs", "1", name="again"
    )
    seen: list[tuple[int, bool]] = []
    deadline = time.monotonic() + 30
    while again.poll() is None and time.monotonic() < deadline:
        served = inference.model_state("net")
        if not seen or seen[-1][0] != served.version:
            seen.append((served.version, served.digest == initial))
        time.sleep(0.05)
    assert exit_code(again, 30) == 0, services.log("again")
    assert not any(is_initial for _, is_initial in seen), (
        f"after the restart the service served the app's initial weights: (version, initial) "
        f"{seen}\n{services.log('again')[-1500:]}"
    )


def test_a_model_with_a_lazy_module_is_refused_at_start_naming_the_tensor(
    services: Services,
) -> None:
    """docs/sync.md, "What a model may hold": a model the services cannot sync (a dtype that
    cannot travel, a factory that raises, extra state that is no tensor) is refused at start by
    both services, "exit status 2 and a line naming the model and the tensor". A model holding
    nn.LazyLinear (parameters without a shape until the first forward) crashes both with a
    torch traceback (exit status 1) that names neither the model nor the tensor."""
    app = f"{APPS}:lazy"
    with pytest.raises(NotReadyError) as caught:
        services.inference(app)
    log = services.log("inference")
    assert "exited with code 2" in str(caught.value), log[-1500:]
    assert "Traceback" not in log
    assert "model 'lazy'" in log and "lin.weight" in log

    trainer = services.trainer(app, [], "--inference", "127.0.0.1:1")
    code = exit_code(trainer, 30)
    log = services.log("trainer")
    assert code == 2, f"exit status {code}\n{log[-1500:]}"
    assert "Traceback" not in log
    assert "model 'lazy'" in log and "lin.weight" in log


def test_a_sync_called_in_train_while_the_service_is_down_does_not_cut_the_run_short(
    services: Services, tmp_path: Path
) -> None:
    """README: "sync() returns once each [inference service] that can be reached has committed
    (one that is down lags, and is caught up in the background when it answers)"; in PAMIQ a
    sync never fails. A trainer whose train() syncs half-way (a long run serving fresher
    weights) gets SyncFailedError out of sync() while its only inference service is down: the
    rest of its train() never runs (the second SGD step is lost) and teardown() is skipped, so
    the run's optimizer state is dropped, although the runner counts the run as done."""
    app = f"{APPS}:midsync"
    inference = services.inference(app)
    gate = tmp_path / "gate"
    gate.write_text("")
    services.env["TEST_GATE"] = str(gate)
    state = tmp_path / "trainer"
    trainer = services.trainer(
        app,
        [inference],
        *("--state-dir", str(state), "--max-runs", "1", "--connect-timeout", "1"),
    )
    wait_until(lambda: Path(f"{gate}.held").exists(), timeout=30)
    inference.process.kill()  # the service goes down while the run trains
    inference.process.wait(timeout=10)
    gate.unlink()
    assert exit_code(trainer, 30) == 0, services.log("trainer")[-1500:]
    checkpoint = Checkpoints(state).current()
    assert checkpoint is not None
    saved = safetensors.torch.load_file(checkpoint / "models" / "net.safetensors")
    steps = int(saved["bn.num_batches_tracked"])
    assert steps == 2, (
        f"the run took {steps} of its 2 SGD steps: sync() raised out of train()\n"
        + services.log("trainer")[-1500:]
    )


def test_a_second_signal_stops_a_trainer_whose_run_does_not_end(
    services: Services, tmp_path: Path
) -> None:
    """The first SIGTERM waits for the run in progress (its sync, then a checkpoint), and says
    so; a train() that never ends would hold the trainer for good, so a second signal ends it
    at once, without a checkpoint."""
    app = f"{APPS}:midsync"
    inference = services.inference(app)
    gate = tmp_path / "gate"
    gate.write_text("")  # never removed: the run waits for good
    services.env["TEST_GATE"] = str(gate)
    trainer = services.trainer(app, [inference], "--state-dir", str(tmp_path / "trainer"))
    wait_until(lambda: Path(f"{gate}.held").exists(), timeout=30)
    trainer.send_signal(signal.SIGTERM)
    wait_until(lambda: "stopping after the run in progress" in services.log("trainer"))
    assert exit_code(trainer, 2) is None  # still in its run
    trainer.send_signal(signal.SIGINT)
    assert exit_code(trainer, 20) == 128 + signal.SIGINT
    assert "SIGINT again: exiting now, without a checkpoint" in services.log("trainer")


def test_a_trainer_whose_data_never_comes_shows_in_its_metrics(
    services: Services, tmp_path: Path
) -> None:
    """A trainer whose training condition is never met (no agent ever sends a sample) runs no
    run, silently: no log line says it waits for data, and its run counter
    (`weightsync_trainer_runs_total{trainer}`, docs/operations.md) is not exported at all until
    its first run, so an alert on the run rate of a trainer that never trained has no series to
    fire on (Prometheus practice: export the labels known at start at 0)."""
    app = f"{APPS}:starved"
    inference = services.inference(app)
    services.start_experience_trainer(
        app,
        [inference.sync],
        *("--trainer-id", "trainer", "--metrics-listen", "127.0.0.1:0"),
        *("--state-dir", str(tmp_path / "trainer")),
    )
    wait_until(lambda: inference.model_state("net").version == 1, timeout=30)
    ready = json.loads((services.directory / "trainer.ready.json").read_text())
    url = f"http://127.0.0.1:{ready['metrics_port']}/metrics"
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    runs = [line for line in text.splitlines() if line.startswith("weightsync_trainer_runs")]
    assert 'weightsync_trainer_runs_total{trainer="starved"} 0.0' in runs, runs
