"""Chain forwarding across emulated hosts (bench/hostlab.py): a trainer host and replica hosts,
each a network namespace of its own on a shaped link, the services addressed by host name
(`replicaN:9001`) with TLS and a token on the sync plane, every certificate naming its host.

Skipped where the lab cannot run (tests/integration/lab.py). The links run at 50 Mbit/s and the
model is 8 MiB, so a push lasts about a second per hop: long enough to kill or cut a replica
while its bytes flow in.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from shared.weights.digest import state_digest
from tests.integration.conftest import Services, wait_until
from tests.integration.lab import Lab, Setup, open_lab
from tests.integration.pki import make_ca, make_cert
from tests.integration.test_forwarding import forwarded_to, stamp_state

STAMP = "tests.integration.apps:stamp"
TOKEN = "lab-sync-secret"
RATE = "50mbit"
STAMP_MB = 8
REPLICAS = ["replica1", "replica2", "replica3"]


def holds(lab: Lab, host: str, version: int, run: int) -> bool:
    """`host` serves `version`, bit-exact the stamp model after trainer run `run`."""
    state = lab.state(host)
    expected = state_digest(stamp_state(run, mb=STAMP_MB)).hex()
    return state.get("version") == version and state.get("digest") == expected


def receiving(lab: Lab, host: str, version: int) -> bool:
    """`host` has bytes of a push of `version` streaming in."""
    state = lab.state(host)
    return state.get("pending_version") == version and state.get("pending_bytes", 0) > 0


@pytest.fixture
def lab(services: Services, tmp_path: Path) -> Iterator[Lab]:
    services.env["TEST_STAMP_MB"] = str(STAMP_MB)
    services.env.update(INFERENCE_SYNC_TOKEN=TOKEN, TRAINER_SYNC_TOKEN=TOKEN)
    hosts = ["trainer", *REPLICAS, "replica4"]
    pki = tmp_path / "pki"
    ca = make_ca(pki, "ca")
    for host in hosts[1:]:
        make_cert(pki, host, ca, f"DNS:{host}")
    services.env["TRAINER_TLS_CA"] = str(ca)
    setup = Setup(
        STAMP,
        "stamp",
        fields=("version", "digest", "pending_version", "pending_bytes"),
        pki=pki,
        token=TOKEN,
    )
    with open_lab(services, hosts, RATE, setup) as opened:
        yield opened


def sync_address(lab: Lab, host: str) -> str:
    return lab.sync_address(host)


def test_three_replicas_on_shaped_links_fed_through_one_chain_by_name_with_tls(lab: Lab) -> None:
    lab.replicas_in(REPLICAS)
    trainer = lab.trainer(REPLICAS, "--max-runs", "2")
    assert trainer.wait(timeout=60) == 0, lab.services.log("trainer")
    for host in REPLICAS:
        assert holds(lab, host, 3, 2), (host, lab.state(host))
    # Versions 2 and 3 went down one chain: the trainer sent each once, to replica1.
    second, third = (sync_address(lab, host) for host in REPLICAS[1:])
    assert forwarded_to(lab.services, "replica1") == [second] * 2
    assert forwarded_to(lab.services, "replica2") == [third] * 2
    assert forwarded_to(lab.services, "replica3") == []
    assert "version 3 committed on 3 inference service(s)" in lab.services.log("trainer")


def test_a_middle_replica_killed_mid_push_is_routed_around_and_caught_up_after_restart(
    lab: Lab,
) -> None:
    lab.replicas_in(REPLICAS)
    # One run after the first sync, then a long wait: only the catch-up can feed replica2.
    trainer = lab.trainer(
        REPLICAS, "--max-runs", "2", "--run-interval", "600", "--connect-timeout", "1"
    )
    wait_until(lambda: receiving(lab, "replica2", 2), timeout=60)
    lab.replicas["replica2"].kill()
    lab.replicas["replica2"].wait(timeout=10)
    wait_until(lambda: "version 2 committed on 2" in lab.services.log("trainer"), timeout=30)
    for host in ("replica1", "replica3"):
        assert holds(lab, host, 2, 1), (host, lab.state(host))
    assert forwarded_to(lab.services, "replica1") == [sync_address(lab, "replica2")]
    assert f"lagging: {sync_address(lab, 'replica2')}" in lab.services.log("trainer")

    lab.replicas_in(["replica2"], suffix="-back")
    wait_until(lambda: holds(lab, "replica2", 2, 1), timeout=30)
    assert trainer.poll() is None  # still waiting out its run interval: no sync did this


def test_a_link_cut_mid_push_is_routed_around_and_the_cut_one_caught_up_once_restored(
    lab: Lab,
) -> None:
    # A hop that takes nothing for 3 s is cut off; a push the trainer sends gets 15 s whole.
    lab.replicas_in(REPLICAS, "--push-idle-timeout-s", "3")
    trainer = lab.trainer(
        REPLICAS,
        *("--max-runs", "2", "--run-interval", "600"),
        *("--connect-timeout", "1", "--push-timeout", "15"),
    )
    # Cut while replica2 passes the push on to replica3: both hold part of it.
    wait_until(lambda: receiving(lab, "replica3", 2), timeout=60)
    lab.hostlab.cut("replica2")
    wait_until(lambda: "version 2 committed on 2" in lab.services.log("trainer"), timeout=30)
    for host in ("replica1", "replica3"):
        assert holds(lab, host, 2, 1), (host, lab.state(host))
    # replica1 cut its stalled hop off within its bound and answered: the trainer never had
    # to give its push to replica1 up and try it again.
    log = lab.services.log("trainer")
    gave_up = f"{sync_address(lab, 'replica1')}: DEADLINE_EXCEEDED: Deadline Exceeded"
    assert gave_up not in log, log
    second, third = sync_address(lab, "replica2"), sync_address(lab, "replica3")
    # Noticed by its transport (no ping answered, no byte acknowledged: UNAVAILABLE) or by
    # the forward stall bound (DEADLINE_EXCEEDED), whichever comes first.
    stalled = rf"passing the push on to {re.escape(second)} failed: (UNAVAILABLE|DEADLINE_EXCEEDED)"
    assert re.search(stalled, lab.services.log("replica1")), lab.services.log("replica1")
    assert f"lagging: {second}" in log
    assert "error" in lab.state("replica2")  # its link is down
    # replica1 went on with replica3 past the cut replica2, from the bytes replica3 held of
    # the push replica2 had been feeding it: the trainer did not push replica3 again, and its
    # one commit of version 2 is that resumed push.
    assert f"routing past {second}: resuming the push on {third} from byte " in (
        lab.services.log("replica1")
    )
    replica3 = lab.services.log("replica3").splitlines()
    [committed] = [line for line in replica3 if "committed version 2" in line]
    assert "resumed from byte " in committed

    lab.hostlab.restore("replica2")
    wait_until(lambda: holds(lab, "replica2", 2, 1), timeout=30)
    wait_until(
        lambda: f"{sync_address(lab, 'replica2')} caught up" in lab.services.log("trainer"),
        timeout=10,
    )
    assert trainer.poll() is None  # still waiting out its run interval: no sync did this


def test_a_replica_added_while_training_is_caught_up(lab: Lab) -> None:
    lab.replicas_in(REPLICAS)
    hosts = [*REPLICAS, "replica4"]  # replica4's host is up, its service not yet
    trainer = lab.trainer(
        hosts, "--max-runs", "2", "--run-interval", "600", "--connect-timeout", "1"
    )
    wait_until(lambda: "version 2 committed on 3" in lab.services.log("trainer"), timeout=60)
    for host in REPLICAS:
        assert holds(lab, host, 2, 1), (host, lab.state(host))

    lab.replicas_in(["replica4"])
    wait_until(lambda: holds(lab, "replica4", 2, 1), timeout=30)
    assert trainer.poll() is None  # training goes on: the catch-up brought it up
    # A neighbour pushed it its copy (dialling it by host name, with TLS and the token), not
    # the trainer.
    added = sync_address(lab, "replica4")
    marker = f"{added} caught up from "
    wait_until(lambda: marker in lab.services.log("trainer"), timeout=10)
    [line] = [line for line in lab.services.log("trainer").splitlines() if marker in line]
    donor = line.split(marker, 1)[1].split(" ", 1)[0]
    [donor_host] = [host for host in REPLICAS if sync_address(lab, host) == donor]
    assert f"seeded {added} with version 2" in lab.services.log(donor_host)
