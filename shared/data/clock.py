"""The clock that stamps collected samples and trainers' training times.

PAMIQ-Core uses its pausable clock; here it is the wall clock, because the stamps are saved in
checkpoints and must still compare after a restart. Remote samples are stamped by the trainer
when they arrive, never by the agent, so agents' clocks do not matter.
"""

from __future__ import annotations

import time


def now() -> float:
    """Seconds since the Unix epoch."""
    return time.time()
