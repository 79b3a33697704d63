"""An outside review of the experience plane as an operator and an agent written apart from it
use it, with real processes: trainer groups that share a buffer, a RemoteDataCollector left open
across a fork of the agent, closed while its trainer has stopped answering, and given a token or
TLS files no call could use.

Probes that behaved as the docs say (takeover while agents stream, checkpoints on a full disk,
a buffer no replica holds, collector misuse) are listed in the review's report, not here."""

from __future__ import annotations

import json
import signal
import sys
import threading
from pathlib import Path

import pytest
import torch
from torch import nn
from typing_extensions import override

from devtools.launch import inference_command, trainer_command
from shared import App, DictSequentialBuffer, TorchTrainer, TorchTrainingModel
from shared.data.remote import RemoteDataCollector
from shared.errors import ConfigurationError
from shared.grpc.auth import TlsFiles
from tests.integration.conftest import Services, wait_until
from tests.integration.experience_apps import CAPACITY, STEPS_TENSORS, SideTrainer
from tests.integration.pki import SERVER_NAME
from tests.integration.test_experience import start_trainer


class CommonTrainer(SideTrainer):
    """Trains the model `side` on the buffer `common`, which the other side's trainer reads too."""

    def __init__(self, side: str) -> None:
        TorchTrainer.__init__(self, "common", min_buffer_size=20, min_new_data_count=20)
        self.side = side

    @override
    def on_data_users_attached(self) -> None:
        self.steps = self.get_data_user("common")


# `sharing`: the trainers `a` and `b` both read the buffer `common`; `c` reads `own` alone.
sharing = App()
for side in ("a", "b", "c"):
    sharing.add_model(side, lambda: TorchTrainingModel(nn.Linear(1, 1), has_inference_model=False))
sharing.add_trainer("a", lambda: CommonTrainer("a"))
sharing.add_trainer("b", lambda: CommonTrainer("b"))
sharing.add_trainer("c", lambda: SideTrainer("c"))
for name in ("common", "c"):
    sharing.add_buffer(
        name, lambda: DictSequentialBuffer(["x", "y", "id"], CAPACITY), tensors=STEPS_TENSORS
    )


def test_trainer_groups_that_share_a_buffer_are_refused_at_start(services: Services) -> None:
    """Both groups' replicas would hold `common`, and an agent streams to one of them only."""
    ready = services.directory / "ready.json"
    process = services.spawn(
        trainer_command(
            "tests.integration.test_review_groups:sharing",
            ["127.0.0.1:1"],
            "--trainer-groups",
            "a;b,c",
            "--state-dir",
            str(services.directory / "groups"),
            "--experience-listen",
            "127.0.0.1:0",
            "--ready-file",
            str(ready),
            "--metrics-listen",
            "off",
        ),
        "trainer",
    )
    wait_until(lambda: process.poll() is not None or ready.exists())
    assert process.wait(timeout=30) == 2  # a configuration error
    assert not ready.exists()
    log = services.log("trainer")
    assert (
        "trainer groups must not share a model or a buffer: buffer 'common' is used by the "
        "groups a and b+c" in log
    )
    assert "put the trainers that share one in one group" in log
    assert "Traceback" not in log


# An agent that forks with its collector open. The child tries the inherited collector (it
# prints how that ended), closes it, then sends ids 1000-1009 through a collector of its own;
# the parent sends ids 10-19 through the inherited one after the fork. A child stuck for 20 s
# prints its stacks and exits 1, so a hang shows as a failure, not a hung test.
FORKING_AGENT = """
import dataclasses, faulthandler, json, os, sys
import torch
from shared.data.remote import RemoteDataCollector

def sample(i):
    return {"x": torch.zeros(1), "y": torch.ones(1), "id": torch.tensor(i)}

collector = RemoteDataCollector(sys.argv[1], "steps", batch_size=4)
for i in range(10):
    collector.collect(sample(i))
assert collector.flush(30)
child = os.fork()
if child == 0:
    faulthandler.dump_traceback_later(20, exit=True)
    for call in (lambda: collector.collect(sample(99)), lambda: collector.flush(1)):
        try:
            call()
            print("child: accepted", flush=True)
        except RuntimeError as exc:
            print(f"child: refused: {exc}", flush=True)
    collector.close()
    print("child: closed", flush=True)
    own = RemoteDataCollector(sys.argv[1], "steps", batch_size=4)
    for i in range(1000, 1010):
        own.collect(sample(i))
    print("child stats " + json.dumps(dataclasses.asdict(own.close(30))), flush=True)
    os._exit(0)
for i in range(10, 20):
    collector.collect(sample(i))
print("parent stats " + json.dumps(dataclasses.asdict(collector.close(30))), flush=True)
_, status = os.waitpid(child, 0)
print(f"child exit {os.waitstatus_to_exitcode(status)}", flush=True)
"""


def stats_line(log: str, who: str) -> dict[str, object]:
    (line,) = [s for s in log.splitlines() if s.startswith(f"{who} stats ")]
    stats: dict[str, object] = json.loads(line.removeprefix(f"{who} stats "))
    return stats


def test_a_collector_open_across_a_fork_refuses_the_child_and_the_parent_sends_once(
    services: Services,
) -> None:
    trainer = start_trainer(services)
    agent = services.spawn([sys.executable, "-c", FORKING_AGENT, trainer.address], "agent")
    assert agent.wait(timeout=90) == 0
    log = services.log("agent")
    refused = [s for s in log.splitlines() if s.startswith("child: ")]
    assert len(refused) == 3, log
    for line in refused[:2]:  # collect() and flush() in the child
        assert line.startswith("child: refused: this RemoteDataCollector was opened in process")
        assert "is a fork of it" in line and "open a RemoteDataCollector in this one" in line
    assert refused[2] == "child: closed"  # at once: it touches none of the parent's connections
    assert "child exit 0" in log
    assert stats_line(log, "parent")["acknowledged"] == 20
    assert stats_line(log, "child")["acknowledged"] == 10
    # Each sample once: the parent's 20 from its collector, the child's 10 from its own.
    assert sorted(trainer.stop()) == [*range(20), *range(1000, 1010)]


def close_at_once(collector: RemoteDataCollector) -> None:
    """close(timeout=0.5), and see it return long before the collector's timeout_s (120 s) of
    waiting on the trainer would."""
    closing = threading.Thread(target=collector.close, kwargs={"timeout": 0.5}, daemon=True)
    closing.start()
    wait_until(lambda: not closing.is_alive(), timeout=60)


def test_close_gives_up_on_a_trainer_that_stopped_answering_without_waiting_for_its_timeout(
    services: Services,
) -> None:
    trainer = start_trainer(services)
    sample = {"x": torch.zeros(1), "y": torch.ones(1)}
    # A trainer gets 120 s to answer or to acknowledge a batch before a call counts as broken.
    streaming = RemoteDataCollector(trainer.address, "steps", timeout_s=120)
    streaming.collect({**sample, "id": torch.tensor(0)})
    assert streaming.flush(timeout=30)
    trainer.process.send_signal(signal.SIGSTOP)  # its port still takes connections: no answer
    try:
        # A collector made now waits on the trainer's list of buffers when close() comes.
        finding = RemoteDataCollector(trainer.address, "steps", timeout_s=120)
        finding.collect({**sample, "id": torch.tensor(100)})
        close_at_once(finding)
        # One with a call open waits on its acknowledgements.
        for i in range(1, 6):
            streaming.collect({**sample, "id": torch.tensor(i)})
        close_at_once(streaming)
    finally:
        trainer.process.send_signal(signal.SIGCONT)
    for collector, stats in ((finding, (1, 0, 1, 0)), (streaming, (6, 1, 5, 0))):
        final = collector.stats
        assert (final.collected, final.acknowledged, final.dropped, final.pending) == stats
        assert final.last_error is not None
        assert "the collector closed before the trainer acknowledged them" in final.last_error
    saved = trainer.stop()
    assert saved[0] == 0 and set(saved) <= set(range(6))  # sent, unacknowledged: maybe stored


def test_a_token_or_tls_files_no_call_could_use_are_refused_when_the_collector_is_made(
    services: Services, pki: Path
) -> None:
    services.env.update(
        TRAINER_EXPERIENCE_TOKEN="agents-only",
        TRAINER_EXPERIENCE_TLS_CERT=str(pki / "server.pem"),
        TRAINER_EXPERIENCE_TLS_KEY=str(pki / "server.key"),
        TRAINER_EXPERIENCE_TLS_CLIENT_CA=str(pki / "ca.pem"),
    )
    trainer = start_trainer(services)
    good = TlsFiles(pki / "client.pem", pki / "client.key", pki / "ca.pem")
    wrong: list[tuple[str, TlsFiles | None, str | None, str]] = [
        # the key file given as the CA: no certificate in it
        ("agents-only", TlsFiles(good.cert, good.key, pki / "client.key"), SERVER_NAME,
         f"{pki / 'client.key'} holds no PEM certificate"),
        ("agents-only", TlsFiles(good.cert, good.key, pki / "missing.pem"), SERVER_NAME,
         "cannot read the TLS file"),
        ("agents-only", TlsFiles(good.cert, None, good.ca), SERVER_NAME,
         "TLS needs a certificate and its key; only a certificate"),
        ("agents-only", None, SERVER_NAME, "a TLS server name needs TLS"),
        ("agents-only\n", good, SERVER_NAME, "the experience token holds characters a gRPC "
         "header cannot carry: it must be printable ASCII"),
    ]  # fmt: skip
    for token, tls, server_name, message in wrong:
        with pytest.raises(ConfigurationError) as refused:
            RemoteDataCollector(
                trainer.address, "steps", token=token, tls=tls, server_name=server_name
            )
        assert message in str(refused.value)
    with RemoteDataCollector(
        trainer.address, "steps", token="agents-only", tls=good, server_name=SERVER_NAME
    ) as collector:
        collector.collect({"x": torch.zeros(1), "y": torch.ones(1), "id": torch.tensor(7)})
        assert collector.flush(timeout=30)
    assert trainer.stop() == [7]


def test_an_inference_service_recording_with_unusable_experience_tls_stops_at_start(
    services: Services, tmp_path: Path, pki: Path
) -> None:
    # The recorder's collectors are made at the first request recorded: a TLS file no call
    # could use must stop the start with a line naming it, not fail every request later.
    command = inference_command(
        "tests.integration.experience_apps:recorded",
        tmp_path / "ready.json",
        "--experience",
        "127.0.0.1:1",
        "--experience-tls-ca",
        str(pki / "client.key"),  # a key, not a certificate
    )
    assert services.spawn(command, "inference").wait(timeout=60) == 2
    assert f"{pki / 'client.key'} holds no PEM certificate" in services.log("inference")
