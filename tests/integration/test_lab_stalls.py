"""A replica whose link is cut mid-push on the host lab (bench/hostlab.py), with direct fan-out:
the trainer cancels its push to it once the stream takes nothing for the push stall timeout,
the sync returns with the others, and the cut one is caught up once its link is back; with the
chain, the replica before a hop whose link goes dark cuts it off as soon as its transport
notices (no ping answered, no byte acknowledged). Skipped where the lab cannot run (see
test_lab_forwarding.py)."""

from __future__ import annotations

from tests.integration.conftest import wait_until
from tests.integration.lab import Lab
from tests.integration.test_lab_forwarding import REPLICAS, holds, lab, receiving, sync_address

__all__ = ["lab"]  # the fixture


def test_a_link_cut_mid_direct_push_is_cancelled_and_the_cut_one_caught_up_once_restored(
    lab: Lab,
) -> None:
    lab.replicas_in(REPLICAS)
    trainer = lab.trainer(
        REPLICAS,
        *("--max-runs", "2", "--run-interval", "600", "--fanout", "direct"),
        *("--connect-timeout", "1", "--push-stall-timeout-s", "2"),
    )
    wait_until(lambda: receiving(lab, "replica2", 2), timeout=60)
    lab.hostlab.cut("replica2")
    wait_until(lambda: "version 2 committed on 2" in lab.services.log("trainer"), timeout=60)
    for host in ("replica1", "replica3"):
        assert holds(lab, host, 2, 1), (host, lab.state(host))
    log = lab.services.log("trainer")
    cut = sync_address(lab, "replica2")
    assert f"lagging: {cut}" in log
    # Cancelled by the trainer's stall bound or, as soon, by the watch on its link (no ping
    # answered), not given up on by TCP or the push deadline; and not retried on the dark link
    # (a retry would wait out the connect timeout there first).
    stalled = f"{cut}: DEADLINE_EXCEEDED: the push took nothing for 2s"
    dark = f"{cut}: UNAVAILABLE: the push's link answered nothing while its stream took nothing"
    assert stalled in log or dark in log, log
    assert "retrying in about" not in log, log
    assert "error" in lab.state("replica2")  # its link is down

    lab.hostlab.restore("replica2")
    wait_until(lambda: holds(lab, "replica2", 2, 1), timeout=30)
    wait_until(lambda: f"{cut} caught up" in lab.services.log("trainer"), timeout=30)
    assert trainer.poll() is None  # waiting out its run interval: the catch-up did it


def test_a_hop_whose_link_goes_dark_is_cut_by_its_transport_well_within_the_stall_bound(
    lab: Lab,
) -> None:
    # A forward stall bound of 8 s, an answer timeout of a minute after the commit (30 s a hop
    # left) and a trainer that would wait for minutes: the watch on the link (a ping every 2 s,
    # the connection dropped once nothing was acknowledged for 4 s) cuts the dark hop off
    # before the bound would (DEADLINE_EXCEEDED), and well before TCP gives up on its own
    # (about 20 s).
    lab.replicas_in(REPLICAS, "--forward-stall-timeout-s", "8", "--push-idle-timeout-s", "30")
    lab.trainer(
        REPLICAS,
        *("--max-runs", "2", "--run-interval", "600", "--connect-timeout", "1"),
        *("--push-stall-timeout-s", "300", "--push-timeout", "300"),
    )
    wait_until(lambda: receiving(lab, "replica3", 2), timeout=60)
    lab.hostlab.cut("replica2")
    wait_until(lambda: "version 2 committed on 2" in lab.services.log("trainer"), timeout=15)
    for host in ("replica1", "replica3"):
        assert holds(lab, host, 2, 1), (host, lab.state(host))
    cut = sync_address(lab, "replica2")
    log = lab.services.log("replica1")
    assert f"passing the push on to {cut} failed: UNAVAILABLE" in log, log
    assert f"routing past {cut}: resuming the push on {sync_address(lab, 'replica3')}" in log
    assert f"lagging: {cut}" in lab.services.log("trainer")
