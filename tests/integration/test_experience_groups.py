"""Experience with trainer groups, with real processes: replicas that split an app's trainer
groups each hold the buffers of their own group, an agent given every replica's address streams
to the one holding its buffer, and a standby that takes a group over from a writer killed with
kill -9 resumes the group's buffers from its last checkpoint (what the writer acknowledged after
that checkpoint is lost), then takes the agent's samples."""

from __future__ import annotations

import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

import grpc
import torch

from devtools.launch import read_json, trainer_command, wait_for
from shared.data.persist import load_samples
from shared.data.remote import RemoteDataCollector
from shared.gen.experience.v1 import experience_pb2 as pb
from shared.gen.experience.v1 import experience_pb2_grpc as pb_grpc
from tests.integration.conftest import Services, wait_until
from tests.integration.test_experience import start_trainer
from tests.integration.test_experience_recording import free_port
from trainer_service.checkpoint import Checkpoints

APP = "tests.integration.experience_apps:grouped"
GROUPS = "left;right"


@dataclass
class Replica:
    process: subprocess.Popen[bytes]
    address: str
    ready: Path

    def holds(self) -> dict[str, int]:
        """Each buffer this replica holds, with the samples in it."""
        with grpc.insecure_channel(self.address) as channel:
            answer = pb_grpc.ExperienceStub(channel).ListBuffers(
                pb.ListBuffersRequest(), timeout=10
            )
        return {b.name: b.size for b in answer.buffers}


def spawn_replica(services: Services, name: str, state: Path) -> Replica:
    ready = services.directory / f"{name}.ready.json"
    address = f"127.0.0.1:{free_port()}"
    command = trainer_command(
        APP,
        ["127.0.0.1:1"],  # the models have no inference copy: never dialled
        "--trainer-groups",
        GROUPS,
        "--state-dir",
        str(state),
        "--experience-listen",
        address,
        "--checkpoint-every",
        "1",
        "--ready-file",
        str(ready),
        "--trainer-id",
        name,
        "--metrics-listen",
        "off",
    )
    return Replica(services.spawn(command, name), address, ready)


def ready(services: Services, replica: Replica, name: str) -> None:
    wait_for(
        replica.process,
        lambda: read_json(replica.ready),
        what=f"trainer {name!r}",
        timeout=60,
        log=services.log_path(name),
    )


def checkpointed_ids(group: Path) -> list[int]:
    saved = Checkpoints(group).current()
    if saved is None:
        return []
    try:
        samples = load_samples(saved / "data" / "right" / "buffer.safetensors")
    except FileNotFoundError:  # replaced by a newer checkpoint while being read: look again
        return checkpointed_ids(group)
    return [int(s["id"]) for s in samples]


def collect(collector: RemoteDataCollector, ids: range) -> None:
    for i in ids:
        x = torch.rand(1)
        collector.collect({"x": x, "y": 3 * x, "id": torch.tensor(i)})
    assert collector.flush(timeout=60)


def test_a_buffer_goes_to_its_groups_replica_and_a_standby_resumes_it_from_the_checkpoint(
    services: Services,
) -> None:
    state = services.directory / "groups"
    first = spawn_replica(services, "first", state)
    ready(services, first, "first")  # it claims the first group, left
    second = spawn_replica(services, "second", state)
    ready(services, second, "second")  # right
    standby = spawn_replica(services, "standby", state)  # every group taken: it stands by
    assert first.holds() == {"left": 0}
    assert second.holds() == {"right": 0}

    every = [first.address, second.address, standby.address]
    with RemoteDataCollector(every, "right", batch_size=16, timeout_s=2) as collector:
        collect(collector, range(100))
        assert collector.holder == second.address
        wait_until(lambda: len(checkpointed_ids(state / "right")) >= 40)  # a run checkpointed
        second.process.send_signal(signal.SIGKILL)
        assert second.process.wait(timeout=30) == -signal.SIGKILL
        kept = checkpointed_ids(state / "right")  # the last checkpoint the writer completed
        assert kept == list(range(len(kept)))

        ready(services, standby, "standby")  # it took the right group over
        assert standby.holds() == {"right": len(kept)}  # resumed from that checkpoint
        collect(collector, range(100, 130))  # the collector finds the standby
        assert collector.holder == standby.address
        stats = collector.stats
    assert (stats.acknowledged, stats.dropped) == (130, 0)
    assert first.holds() == {"left": 0}  # nothing for the right group went to the left's

    standby.process.send_signal(signal.SIGTERM)
    assert standby.process.wait(timeout=60) == 0
    # The samples acknowledged after that checkpoint, up to the kill, are lost; nothing else.
    assert checkpointed_ids(state / "right") == [*kept, *range(100, 130)]


def test_a_fenced_trainer_keeps_the_samples_it_acknowledged_in_its_checkpoint(
    services: Services,
) -> None:
    """A second writer (another state directory: a careless deployment) takes the model over;
    the first learns it at its next push and exits 3, after a checkpoint: the samples it
    acknowledged are no agent's to send again, and a standby on its directory resumes them.
    (It wrote none before: checkpoints only on exit lost every one of them.)"""
    app = "tests.integration.experience_apps:served_steps"
    inference = services.inference(app)
    first = start_trainer(
        services, "--checkpoint-every", "0", app=app, targets=(inference.sync,), name="first"
    )
    wait_until(lambda: inference.model_state("line").writer_id == "first")
    start_trainer(services, app=app, targets=(inference.sync,), name="other")
    wait_until(lambda: inference.model_state("line").writer_id == "other")
    with RemoteDataCollector(first.address, "steps", batch_size=10, timeout_s=5) as collector:
        collect(collector, range(30))  # acknowledged; 20 new samples: a run, and its push
        assert collector.stats.acknowledged == 30
    assert first.process.wait(timeout=60) == 3
    log = services.log("first")
    assert "a trainer was fenced after" in log and "checkpointing before exiting" in log, log
    saved = Checkpoints(first.state).current()
    assert saved is not None
    samples = load_samples(saved / "data" / "steps" / "buffer.safetensors")
    assert sorted(int(s["id"]) for s in samples) == list(range(30))
