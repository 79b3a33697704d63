"""Encoded deltas across emulated hosts (bench/hostlab.py): a trainer host and three replica
hosts on shaped links, the services addressed by host name (`replicaN:9001`).

The model trains in fp32 at a small learning rate and is served in bf16
(tests/integration/encoding_apps.py): with `--push-encoding auto` the trainer measures each
link and sends the changed tensors `sparse`, down one chain whose replicas pass the encoded
bytes on as they arrive; every replica must serve the trained weights converted, bit for bit.
A replica restarted without its state holds no base: it gets whole tensors, then deltas again.

Skipped where the lab cannot run (tests/integration/lab.py).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from shared.weights.digest import state_digest
from tests.integration.conftest import Services, wait_until
from tests.integration.lab import Lab, Setup, open_lab
from tests.integration.test_encodings import committed, trained_bf16

APP = "tests.integration.encoding_apps:served_bf16"
RATE = "20mbit"  # a link the encoders outrun many times over: `auto` must encode
REPLICAS = ["replica1", "replica2", "replica3"]


@pytest.fixture
def lab(services: Services) -> Iterator[Lab]:
    setup = Setup(
        APP,
        "wide",
        replica_args=("--allow-open-sync", "--log-level", "DEBUG"),
        trainer_args=("--log-level", "DEBUG"),
    )
    with open_lab(services, ["trainer", *REPLICAS], RATE, setup) as opened:
        yield opened


def travelled(log: str, address: str) -> list[tuple[str, str]]:
    """Each push the trainer committed on `address`: its kind and how its tensors travelled."""
    return re.findall(rf"\((full|delta on \d+)\) committed on {address}: .*tensors: (.*)", log)


def test_sparse_deltas_chosen_by_auto_are_forwarded_encoded_and_a_restarted_replica_gets_whole(
    lab: Lab, tmp_path: Path
) -> None:
    lab.replicas_in(REPLICAS)
    state_dir = tmp_path / "trainer"
    trainer = lab.trainer(
        REPLICAS,
        # Runs enough to outlast a replica's restart on two busy cores.
        *("--max-runs", "30", "--run-interval", "0.3", "--state-dir", str(state_dir)),
    )
    wait_until(lambda: lab.state("replica3").get("version", 0) >= 4, timeout=60)

    # The last replica restarts in its host without its state: no base to decode against.
    lab.replicas["replica3"].terminate()
    assert lab.replicas["replica3"].wait(timeout=30) == 0
    lab.replicas_in(["replica3"], suffix="-again")
    third = lab.sync_address("replica3")
    wait_until(  # the first version went to it directly, in full; its catch-up does too
        lambda: [k for k, _ in travelled(lab.services.log("trainer"), third)].count("full") >= 2,
        timeout=60,
    )
    assert trainer.wait(timeout=90) == 0, lab.services.log("trainer")

    log = lab.services.log("trainer")
    # On the shaped link `auto` measured the link, then sent the changed tensors sparse, once
    # per version, to the head of the chain; the others were fed through it.
    head = travelled(log, lab.sync_address("replica1"))
    assert head[0] == ("full", "whole=4"), head
    assert all(kind.startswith("delta on") for kind, _ in head[1:]), head
    assert all(re.search(r"(sparse|xor-\w+)=", tensors) for _, tensors in head[1:]), head
    assert any("sparse=" in tensors for _, tensors in head[1:]), head
    assert "passing the push on to " in lab.services.log("replica1")
    assert "passing the push on to " in lab.services.log("replica2")
    assert len(committed(lab.services.log("replica2"))) == len(head)
    # The restarted replica got a full push of whole tensors, then deltas again.
    again = committed(lab.services.log("replica3-again"))
    assert again[0] == "full" and again[-1].startswith("delta on"), again
    expected = state_digest(trained_bf16(state_dir)).hex()
    for host in REPLICAS:
        assert lab.state(host) == {"version": 31, "digest": expected}, host
