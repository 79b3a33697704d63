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
import signal
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
        # Trains until the test has seen the restarted replica caught up, however slow the host.
        *("--run-interval", "0.3", "--state-dir", str(state_dir)),
    )
    wait_until(lambda: lab.state("replica3").get("version", 0) >= 4, timeout=60)

    # The last replica restarts in its host without its state: no base to decode against.
    lab.replicas["replica3"].terminate()
    assert lab.replicas["replica3"].wait(timeout=30) == 0
    lab.replicas_in(["replica3"], suffix="-again")
    # It gets whole tensors (from the trainer or seeded by a neighbour), then deltas again.
    wait_until(
        lambda: (
            committed(lab.services.log("replica3-again"))[:1] == ["full"]
            and committed(lab.services.log("replica3-again"))[-1].startswith("delta on")
        ),
        timeout=120,
    )
    trainer.send_signal(signal.SIGTERM)  # it ends the run in hand, its push included, and saves
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
    expected = state_digest(trained_bf16(state_dir)).hex()
    runs = max(int(n) for n in re.findall(r"trainer \w+: run (\d+) in", log))
    for host in REPLICAS:
        assert lab.state(host) == {"version": runs + 1, "digest": expected}, host


def test_dense_changes_keep_probes_not_copies_and_sparse_ones_travel_encoded_again(
    lab: Lab, tmp_path: Path
) -> None:
    """A change so dense that no encoding is smaller travels whole, and the trainer keeps only
    a probe of it for the next version's measurement (no copy of the whole tensors); once the
    changes turn sparse, a whole copy is kept again and the deltas after it travel encoded.
    Two replicas in a chain: what the second acknowledges is what the first did, hashes the
    trainer did not take up front included."""
    pair = ["replica1", "replica2"]
    lab.replicas_in(pair)
    lab.services.env["TEST_LR"] = "1e-2"  # every bf16 element moves: dense
    lab.services.env["TEST_LR_LATER"] = "8:1e-6"  # a few percent move: sparse
    state_dir = tmp_path / "trainer"
    trainer = lab.trainer(
        pair,
        *("--max-runs", "14", "--run-interval", "0.1", "--state-dir", str(state_dir)),
    )
    assert trainer.wait(timeout=120) == 0, lab.services.log("trainer")
    log = lab.services.log("trainer")
    head = travelled(log, lab.sync_address("replica1"))
    assert len(head) == 15 and head[0] == ("full", "whole=4"), head
    # Runs 1 to 7 (versions 2 to 8): dense, whole tensors; a tensor whose change was measured
    # dense is kept as a probe only. How dense each tensor's change measures depends on the
    # run's random data, so one may now and then be kept whole: most must be probes.
    assert all(tensors == "whole=4" for _, tensors in head[1:8]), head
    kept = {  # version -> (tensors copied or kept as they are, tensors kept as probes)
        int(v): (int(copied) + int(same), int(probes))
        for v, copied, same, probes in re.findall(
            r"wide v(\d+) kept to encode later deltas against: (\d+) tensor\(s\) copied "
            r"\(\d+ bytes\), (\d+) kept as they are .*, (\d+) as probes",
            log,
        )
    }
    dense = [kept[v] for v in range(3, 9)]
    assert sum(probes for _, probes in dense) >= 20, kept  # of the 24 tensor versions
    # A tensor whose probe shows it changed is not hashed before its push, only as it streams.
    known = re.findall(r"wide v(\d+): \d+ tensor\(s\) hashed up front, (\d+) known changed", log)
    assert sum(int(n) for v, n in known if 4 <= int(v) <= 8) >= 10, known
    # Runs 8 on: sparse; measured on the probes, then whole tensors kept, then encoded deltas.
    assert any(kept.get(v, (0, 0))[0] >= 1 for v in range(9, 15)), kept
    assert any("sparse=" in tensors for _, tensors in head[10:]), head
    expected = state_digest(trained_bf16(state_dir)).hex()
    for replica in pair:
        assert lab.state(replica) == {"version": 15, "digest": expected}
