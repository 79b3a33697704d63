"""A service serving a version near the end of the range (2^63 - 1), pushed there by a bug or
by hand with the sync token, must not run every other service out of versions: the trainer
numbers no version within 2^40 of that end, and leaves such a service out (found by an outside
review: one replica at 2^63 - 3 took the others to 2^63 - 1, and no push was taken after)."""

from __future__ import annotations

from shared.grpc.channel import open_channel
from shared.grpc.options import SYNC_MAX_MESSAGE_BYTES
from tests.integration.conftest import Services
from tests.integration.stamp_writer import STAMP, StampWriter

NEAR_THE_END = (1 << 63) - 3


def test_a_replica_serving_a_version_near_2_63_is_left_out_and_the_others_are_fed(
    services: Services,
) -> None:
    services.env["TEST_STAMP_MB"] = "1"
    fed = [services.inference(STAMP, name=f"inference-{i}") for i in range(2)]
    high = services.inference(STAMP, name="inference-high")
    writer = StampWriter(open_channel(high.sync, SYNC_MAX_MESSAGE_BYTES), 1, "leftover")
    writer.acquire()
    digest = writer.push(7.0, NEAR_THE_END)

    trainer = services.trainer(STAMP, [*fed, high], "--max-runs", "3")
    assert trainer.wait(timeout=120) == 0, services.log("trainer")
    states = [i.model_state("stamp") for i in fed]
    assert states[0].version == states[1].version < 1 << 40
    assert states[0].version >= 3 and states[0].digest == states[1].digest
    left = high.model_state("stamp")
    assert (left.version, left.digest) == (NEAR_THE_END, digest)  # left as it was
    log = services.log("trainer")
    assert f"it serves version {NEAR_THE_END}, within 2^40 of the last version" in log
    assert f"remove the model's state on {high.sync}" in log


def test_a_trainer_whose_only_replica_serves_a_version_near_2_63_stops_with_status_2(
    services: Services,
) -> None:
    services.env["TEST_STAMP_MB"] = "1"
    high = services.inference(STAMP)
    writer = StampWriter(open_channel(high.sync, SYNC_MAX_MESSAGE_BYTES), 1, "leftover")
    writer.acquire()
    writer.push(7.0, NEAR_THE_END)

    trainer = services.trainer(STAMP, [high], "--max-runs", "1")
    assert trainer.wait(timeout=120) == 2, services.log("trainer")
    log = services.log("trainer")
    assert "every inference service is left out" in log and "Traceback" not in log
    assert high.model_state("stamp").version == NEAR_THE_END
