"""The trainer's experience plane with real processes: agents stream samples into a trainer's
buffer over experience.v1, the trainer trains when its data says so, and what it acknowledged
survives an agent's kill -9 and its own restart; an agent whose trainer is away keeps the newest
samples within its bounds. What is refused (bad batches, credentials) is in
test_experience_refusals.py; the helpers here start trainers and agents for both."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import grpc
import torch

from devtools.launch import read_json, trainer_command, wait_for
from shared.data.batch import encode_batch
from shared.data.persist import load_samples
from shared.data.remote import RemoteDataCollector
from shared.gen.experience.v1 import experience_pb2 as pb
from shared.gen.experience.v1 import experience_pb2_grpc as pb_grpc
from tests.integration.conftest import Services, wait_until

APP = "tests.integration.experience_apps:steps"
AGENT = [sys.executable, "-m", "tests.integration.experience_agent"]


@dataclass
class Trainer:
    process: subprocess.Popen[bytes]
    address: str
    state: Path

    def buffers(self, token: str | None = None) -> pb.ListBuffersResponse:
        metadata = (("authorization", f"Bearer {token}"),) if token else ()
        with grpc.insecure_channel(self.address) as channel:
            answer: pb.ListBuffersResponse = pb_grpc.ExperienceStub(channel).ListBuffers(
                pb.ListBuffersRequest(), timeout=10, metadata=metadata
            )
        return answer

    def steps(self) -> pb.BufferState:
        (state,) = self.buffers().buffers
        return state

    def stop(self) -> list[int]:
        """SIGTERM, wait for the exit, and return the ids in its last checkpoint's buffer."""
        self.process.send_signal(signal.SIGTERM)
        assert self.process.wait(timeout=60) == 0
        return saved_ids(self.state)


def saved_ids(state: Path) -> list[int]:
    samples = load_samples(state / "checkpoint" / "data" / "steps" / "buffer.safetensors")
    return [int(s["id"]) for s in samples]


def start_trainer(
    services: Services,
    *extra: str,
    name: str = "trainer",
    app: str = APP,
    targets: tuple[str, ...] = ("127.0.0.1:1",),  # APP's model has no inference copy: never dialled
) -> Trainer:
    ready = services.directory / f"{name}.ready.json"
    ready.unlink(missing_ok=True)
    state = services.directory / f"{name}-state"
    command = trainer_command(
        app,
        targets,
        "--experience-listen",
        "127.0.0.1:0",
        "--ready-file",
        str(ready),
        "--state-dir",
        str(state),
        "--trainer-id",
        name,
        "--metrics-listen",
        "off",
        *extra,
    )
    process = services.spawn(command, name)
    found = wait_for(
        process,
        lambda: read_json(ready),
        what=f"trainer {name!r}",
        timeout=60,
        log=services.log_path(name),
    )
    return Trainer(process, f"127.0.0.1:{found['experience_port']}", state)


def start_agent(
    services: Services, trainer: Trainer, name: str, *args: str
) -> subprocess.Popen[bytes]:
    return services.spawn([*AGENT, "--address", trainer.address, *args], name)


def final_stats(services: Services, name: str) -> dict[str, object]:
    (line,) = [s for s in services.log(name).splitlines() if s.startswith("stats ")]
    stats: dict[str, object] = json.loads(line.removeprefix("stats "))
    return stats


def good(first: int, count: int) -> bytes:
    """The payload of a batch of `count` samples the buffer takes, ids from `first`."""
    return encode_batch(
        [
            {"x": torch.zeros(1), "y": torch.ones(1), "id": torch.tensor(i)}
            for i in range(first, first + count)
        ]
    )


def test_two_agents_stream_into_one_trainer_that_trains_on_their_samples(
    services: Services,
) -> None:
    trainer = start_trainer(services)
    agents = [
        start_agent(services, trainer, "agent-a", "--first-id", "0", "--count", "300"),
        start_agent(services, trainer, "agent-b", "--first-id", "1000", "--count", "300"),
    ]
    for agent in agents:
        assert agent.wait(timeout=120) == 0
    for name in ("agent-a", "agent-b"):
        stats = final_stats(services, name)
        assert (stats["collected"], stats["acknowledged"], stats["dropped"]) == (300, 300, 0)
    assert trainer.steps().received == 600
    wait_until(lambda: trainer.steps().size == 600)  # the trainer moved them into its buffer
    ids = trainer.stop()
    assert sorted(ids) == [*range(300), *range(1000, 1300)]  # each once
    a, b = [i for i in ids if i < 1000], [i for i in ids if i >= 1000]
    assert a == sorted(a) and b == sorted(b)  # each agent's samples in its order
    runs = re.findall(r"trainer fit: run (\d+)", services.log("trainer"))
    assert 1 <= len(runs) <= 600 // 20  # it trains only once 20 new samples are in


def test_an_agent_killed_mid_stream_loses_nothing_acknowledged(services: Services) -> None:
    trainer = start_trainer(services)
    agent = start_agent(
        services, trainer, "agent", "--count", "1000000", "--pause", "0.001", "--batch-size", "8"
    )

    def acknowledged() -> list[tuple[int, int]]:
        found = re.findall(r"^acknowledged (\d+) dropped (\d+)$", services.log("agent"), re.M)
        return [(int(k), int(d)) for k, d in found]

    wait_until(lambda: any(k >= 300 for k, _ in acknowledged()))
    agent.send_signal(signal.SIGKILL)  # while it streams: batches in flight, none flushed
    assert agent.wait(timeout=30) == -signal.SIGKILL
    last, dropped = acknowledged()[-1]
    assert dropped == 0  # so the samples acknowledged are ids 0 .. last - 1
    assert trainer.steps().received >= last
    ids = trainer.stop()
    assert len(ids) >= last
    assert ids == list(range(len(ids)))  # every acknowledged one, in order, none twice


def test_a_restarted_trainer_resumes_its_buffers_from_its_checkpoint(services: Services) -> None:
    trainer = start_trainer(services)
    with RemoteDataCollector(trainer.address, "steps") as collector:
        for i in range(120):
            collector.collect({"x": torch.rand(1), "y": torch.rand(1), "id": torch.tensor(i)})
        assert collector.flush(timeout=60)
    assert trainer.stop() == list(range(120))

    again = start_trainer(services, name="trainer")  # the same state directory
    state = again.steps()
    assert (state.size, state.received) == (120, 0)  # restored, none received since
    with RemoteDataCollector(again.address, "steps") as collector:
        for i in range(120, 150):
            collector.collect({"x": torch.rand(1), "y": torch.rand(1), "id": torch.tensor(i)})
        assert collector.flush(timeout=60)
    wait_until(lambda: again.steps().size == 150)
    assert again.stop() == list(range(150))


def test_a_trainer_stopped_before_any_sample_arrived_restarts_from_its_empty_buffers(
    services: Services,
) -> None:
    trainer = start_trainer(services)
    assert trainer.stop() == []  # its checkpoint holds the buffer, empty
    assert (trainer.state / "checkpoint" / "data" / "steps").is_dir()

    again = start_trainer(services, name="trainer")  # the same state directory
    state = again.steps()
    assert (state.size, state.received) == (0, 0)
    with RemoteDataCollector(again.address, "steps") as collector:
        for i in range(10):
            collector.collect({"x": torch.rand(1), "y": torch.rand(1), "id": torch.tensor(i)})
        assert collector.flush(timeout=60)
    assert again.stop() == list(range(10))


def test_an_agent_holds_max_pending_bytes_while_its_trainer_is_away_then_sends_the_newest(
    services: Services,
) -> None:
    trainer = start_trainer(services)
    # A sample is x and y (FP32 [1]) and id (INT64): 16 bytes, so 160 bytes hold 10 of them.
    trainer.process.send_signal(signal.SIGSTOP)  # away: it answers nothing until SIGCONT
    try:
        collector = RemoteDataCollector(
            trainer.address, "steps", max_pending=1000, max_pending_bytes=160, timeout_s=60
        )
        for i in range(50):
            x = torch.tensor([i / 3])
            collector.collect({"x": x, "y": -x, "id": torch.tensor(i)})  # never waits
        stats = collector.stats
    finally:
        trainer.process.send_signal(signal.SIGCONT)
    assert (stats.collected, stats.acknowledged, stats.dropped, stats.pending) == (50, 0, 40, 10)
    assert stats.last_error is not None
    assert stats.last_error.startswith(
        "dropped 1 sample(s): the queue of samples waiting for the trainer is full: 10 samples "
        "of 16 bytes (max_pending 1000, max_pending_bytes 160)"
    )
    assert collector.flush(timeout=60)
    final = collector.close()
    assert (final.acknowledged, final.dropped, final.pending) == (10, 40, 0)
    assert trainer.stop() == list(range(40, 50))  # the newest, once each
    saved = load_samples(trainer.state / "checkpoint" / "data" / "steps" / "buffer.safetensors")
    for i, stored in zip(range(40, 50), saved, strict=True):
        x = torch.tensor([i / 3])
        assert torch.equal(stored["x"], x) and torch.equal(stored["y"], -x)  # bit-exact


# An agent that collects, after plain samples, one whose tensor has no memory of its own: an
# efficient zero tensor (what autograd hands out for a gradient known to be zero) reads as a
# plain contiguous CPU tensor but its data pointer is null.
ZERO_TENSOR_AGENT = """
import sys
import torch
from shared.data.remote import RemoteDataCollector
collector = RemoteDataCollector(sys.argv[1], "steps", batch_size=4)
for i in range(3):
    collector.collect({"x": torch.full((1,), 0.5), "y": torch.ones(1), "id": torch.tensor(i)})
zero = torch._efficientzerotensor(1)
collector.collect({"x": zero, "y": torch.ones(1), "id": torch.tensor(3)})
assert collector.flush(timeout=60)
stats = collector.close()
print("stats", stats.acknowledged, stats.dropped, flush=True)
"""


def test_a_tensor_with_no_memory_of_its_own_is_sent_as_its_values(services: Services) -> None:
    trainer = start_trainer(services)
    agent = services.spawn([sys.executable, "-c", ZERO_TENSOR_AGENT, trainer.address], "agent")
    assert agent.wait(timeout=60) == 0, services.log("agent")  # not killed by SIGSEGV
    assert "stats 4 0" in services.log("agent")
    assert trainer.stop() == [0, 1, 2, 3]
    saved = load_samples(trainer.state / "checkpoint" / "data" / "steps" / "buffer.safetensors")
    assert [s["x"].tolist() for s in saved] == [[0.5], [0.5], [0.5], [0.0]]


def test_the_online_example_learns_from_what_its_agent_streams(services: Services) -> None:
    inference = services.inference("examples.online:app")
    trainer = start_trainer(services, app="examples.online:app", targets=(inference.sync,))
    wait_until(lambda: inference.model_state("online").version == 1)  # its first weights
    agent = services.spawn(
        [
            sys.executable,
            "examples/agent.py",
            "--inference",
            inference.data,
            "--trainer",
            trainer.address,
            "--seconds",
            "4",
        ],
        "agent",
    )
    assert agent.wait(timeout=120) == 0
    (last,) = re.findall(
        r"^collected (\d+), acknowledged (\d+), dropped (\d+)$", services.log("agent"), re.M
    )
    collected, acknowledged, dropped = map(int, last)
    assert collected == acknowledged > 128 and dropped == 0
    # The trainer trains only on the agent's samples, 128 new ones at a time, and pushes.
    wait_until(lambda: inference.model_state("online").version >= 2)
    assert re.search(r"trainer online: run \d+", services.log("trainer"))
    trainer.process.send_signal(signal.SIGTERM)  # before the inference service it pushes to
    assert trainer.process.wait(timeout=60) == 0
