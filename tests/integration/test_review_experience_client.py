"""A review of the experience plane's client, `RemoteDataCollector`, used as a careless user
would, from its documentation alone, against a real trainer over gRPC: what it reports as
dropped is what the trainer lacks, and a setting no call could use is refused when it is made."""

from __future__ import annotations

import math
import signal

import pytest
import torch

from devtools.launch import trainer_command
from devtools.ports import free_port
from shared.data.remote import RemoteDataCollector
from tests.integration.conftest import Services, wait_until
from tests.integration.test_experience import start_trainer


def sample(i: int) -> dict[str, torch.Tensor]:
    x = torch.tensor([i / 3])
    return {"x": x, "y": -x, "id": torch.tensor(i)}


# Settings a careless user may pass, and what each did before collectors refused them.
BAD_DURATIONS: list[tuple[str, object]] = [
    ("timeout_s", None),  # "no timeout": the sending thread died comparing with None
    ("timeout_s", 0),
    ("timeout_s", -1.0),  # every call ended at once: everything collected was dropped
    ("timeout_s", math.inf),  # close() raised OverflowError
    ("timeout_s", math.nan),
    ("max_delay_s", None),  # the sending thread died: nothing was ever sent
    ("max_delay_s", -1.0),
    ("max_delay_s", math.inf),
    ("retry_max_s", math.nan),
    ("retry_max_s", "1"),
    ("idle_close_s", None),
    ("idle_close_s", True),
]


def test_a_duration_no_call_could_use_is_refused_when_the_collector_is_made(
    services: Services,
) -> None:
    """A collector's durations are seconds, finite, none negative and `timeout_s` above 0:
    anything else is refused when the collector is made, naming the setting, rather than
    leaving a collector whose sending thread died or that drops all it collects."""
    trainer = start_trainer(services)
    for setting, value in BAD_DURATIONS:
        with pytest.raises(ValueError, match=setting):
            RemoteDataCollector(trainer.address, "steps", **{setting: value})
    with RemoteDataCollector(trainer.address, "steps", max_delay_s=0, timeout_s=30) as collector:
        collector.collect(sample(0))
        assert collector.flush(timeout=60)
    assert trainer.stop() == [0]


def test_what_a_collector_reports_dropped_is_what_a_trainer_restarted_mid_stream_lacks(
    services: Services,
) -> None:
    """A trainer stopped (gracefully) while an agent streams and started again on its port: the
    agent holds what it can meanwhile, and every sample collected is either in the trainer's
    buffer or counted in `stats.dropped`, as many missing as counted."""
    port = free_port()
    listen = ("--experience-listen", f"127.0.0.1:{port}")
    trainer = start_trainer(services, *listen)
    collector = RemoteDataCollector(
        trainer.address, "steps", batch_size=8, max_pending=50, retry_max_s=0.2, timeout_s=30
    )
    total = 0

    def collect(count: int) -> None:
        nonlocal total
        for _ in range(count):
            collector.collect(sample(total))
            total += 1

    try:
        collect(200)
        wait_until(lambda: collector.stats.pending == 0)  # acknowledged or dropped
        trainer.process.send_signal(signal.SIGTERM)
        assert trainer.process.wait(timeout=60) == 0
        collect(300)  # the trainer away: the newest 50 kept, the rest dropped
        again = start_trainer(services, *listen)
        collect(100)
        assert collector.flush(timeout=60)
    finally:
        stats = collector.close(timeout=30)
    assert stats.collected == total == stats.acknowledged + stats.dropped
    stored = again.stop()
    assert len(stored) == len(set(stored))  # none twice
    missing = set(range(total)) - set(stored)
    assert len(missing) == stats.dropped


def test_a_trainer_refuses_to_resume_samples_its_apps_buffer_no_longer_declares(
    services: Services,
) -> None:
    """The app's buffer changed its tensors (a shape, a dtype, a name) since the checkpoint: the
    trainer does not resume the old samples into it (its trainer would fail on the first run
    mixing them with new ones, and checkpoint the mix, again at every restart); it stops at
    start naming the buffer and the tensor. A change the old samples still fit resumes."""
    trainer = start_trainer(services)
    with RemoteDataCollector(trainer.address, "steps") as collector:
        for i in range(30):
            collector.collect(sample(i))
        assert collector.flush(timeout=60)
    assert trainer.stop() == list(range(30))
    for variant, why in [
        ("wider", "tensor 'x' is FP32 [1] in 30 of them, the buffer holds FP32 [2]"),
        ("doubled", "tensor 'x' is FP32 [1] in 30 of them, the buffer holds FP64 [1]"),
        ("renamed", "they hold tensor 'id', the buffer holds x, y, reward"),
    ]:
        process = services.spawn(
            trainer_command(
                f"tests.integration.review_changed_apps:{variant}",
                ["127.0.0.1:1"],
                "--experience-listen",
                "127.0.0.1:0",
                "--state-dir",
                str(trainer.state),
                "--metrics-listen",
                "off",
            ),
            variant,
        )
        assert process.wait(timeout=60) == 2, services.log(variant)
        log = services.log(variant)
        assert "buffer 'steps' resumed 30 samples" in log and why in log, log
    again = start_trainer(services, app="tests.integration.review_changed_apps:wider_any")
    assert again.steps().size == 30
    assert again.stop() == list(range(30))
