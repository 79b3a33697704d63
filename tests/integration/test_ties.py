"""A model with tied weights (an LM head tied to its embedding, a layer registered twice, a
buffer aliasing a parameter) trained and pushed through a chain of two replicas: each tied
tensor crosses every link once, and every replica serves it under all its names, bit for bit."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from shared.weights.digest import state_digest
from shared.weights.writer import Payload
from tests.integration.conftest import Services
from tests.integration.test_review_models import APPS, checkpoint, infer, local
from tests.integration.user_models import TiedLM

COMMITTED = re.compile(
    r"committed version (\d+) from \S+ \((full|delta on \d+), \d+ tensors, (\d+) bytes"
)


def test_tied_tensors_cross_each_link_once_and_every_replica_serves_them_bit_exactly(
    services: Services, tmp_path: Path
) -> None:
    first = services.inference(f"{APPS}:tied", name="first")
    second = services.inference(f"{APPS}:tied", "--sync-relay", "off", name="second")
    trainer = services.trainer(  # a chain: `first` passes each push on to `second`
        f"{APPS}:tied",
        [first, second],
        *("--max-runs", "3", "--state-dir", str(tmp_path / "trainer")),
    )
    assert trainer.wait(timeout=120) == 0, services.log("trainer")
    state = TiedLM().state_dict()
    once = Payload.of_state(state).nbytes
    assert Payload.of(list(state.items())).nbytes - once >= 16 * 8 * 4 + 8 * 4 * 2
    trained = checkpoint(tmp_path, "tied")
    for name in ("first", "second"):
        pushes = COMMITTED.findall(services.log(name))
        assert [(v, kind) for v, kind, _ in pushes][:1] == [("1", "full")], services.log(name)
        assert int(pushes[0][2]) == once  # the full push carried each tensor once
        assert all(int(nbytes) <= once for _, _, nbytes in pushes)
    for inference in (first, second):
        version, served = infer(inference, "tied")
        assert version == "4"
        assert inference.model_state("tied").digest == state_digest(trained)
        np.testing.assert_array_equal(served, local(TiedLM(), trained, None))
