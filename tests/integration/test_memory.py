"""The receiving side of a push reuses its memory (shared/allocator.py).

grpcio gives every received message to Python as a new buffer; with glibc's default malloc
thresholds the heap those buffers come from is shrunk and regrown around each one, so receiving
a push page-faulted every page it passed through again and again. Page faults are counted by the
kernel for the service process, so this checks the behaviour directly, not a timing.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration.conftest import Inference, Services
from tests.integration.test_pair import STAMP, filled_stamp
from trainer_service.publisher import Publisher

MB = 64
PUSHES = 3
PAGE = 4096


def minor_faults(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[7])  # minflt, the tenth field of stat


def received_faults(services: Services, *extra: str) -> tuple[int, int]:
    """Page faults of the inference service while it receives PUSHES full pushes; and pages."""
    services.env["TEST_STAMP_MB"] = str(MB)
    inference: Inference = services.inference(STAMP, *extra)
    publisher = Publisher([inference.sync], "memory-test")
    try:
        state = filled_stamp(MB, 1.0)
        publisher.publish("stamp", state)  # the first push allocates the standby copy
        publisher.publish("stamp", state, full=True)
        before = minor_faults(inference.process.pid)
        for _ in range(PUSHES):
            publisher.publish("stamp", state, full=True)
        faults = minor_faults(inference.process.pid) - before
    finally:
        publisher.close()
    return faults, PUSHES * MB * (1 << 20) // PAGE


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
def test_receiving_pushes_does_not_fault_their_pages_again(services: Services) -> None:
    faults, pages = received_faults(services)
    # Without the malloc settings this was 60-100% of the pages received; with them, mostly a
    # handful, and now and then a few percent while the heap grows to a new peak.
    assert faults < pages // 4, f"{faults} page faults while receiving {pages} pages"
