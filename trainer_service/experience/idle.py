"""The idle bound on Collect calls: a call that waits on its agent too long is ended.

Each Collect call holds one of the plane's call slots and a pool thread until it ends, so a call
that waits on its agent, for its next batch or for room to send an acknowledgement (an agent
that never reads them), for `--experience-idle-timeout-s` is ended with DEADLINE_EXCEEDED and a
message saying why (shared/grpc/idle.py); the batches acknowledged before stay stored. A
RemoteDataCollector ends its own idle calls sooner (`idle_close_s`) and connects again when it
has samples to send.
"""

from __future__ import annotations

from shared.grpc.idle import IdleCalls

DEFAULT_IDLE_TIMEOUT_S = 60.0


def idle_collect_calls(timeout_s: float) -> IdleCalls:
    """The watch that ends Collect calls idle for `timeout_s`."""
    return IdleCalls(
        timeout_s,
        f"the Collect call sent no batch and took no acknowledgement for {timeout_s:g}s "
        "(--experience-idle-timeout-s): the trainer ended it to free its slot; the batches "
        "acknowledged before are stored",
        "experience plane",
    )
