"""PAMIQ's `DataCollector.collect()` for an agent that runs apart from its trainer.

    with RemoteDataCollector("trainer:8201", "steps", token=TOKEN) as collector:
        while running:
            ...
            collector.collect({"x": obs, "y": target})   # returns at once

`collector.py` is the collector (the agent's calls); `sender.py` the thread that batches and
sends; `pending.py` the samples waiting, in per-batch slabs that `memory.py` allocates and
`wire.py` lays out as messages; `call.py` one experience.v1 Collect call and how its end reads;
`route.py` which of the trainers the collector was given holds its buffer; `samples.py` the
samples and the stats it reports.

It lives in `shared/data` beside PAMIQ's collector because it is the same API's remote end, for
any process that collects (an agent, or a service recording what it serves): it needs nothing
of either service but the experience.v1 stubs and the channel factory.
"""

from shared.data.remote.collector import RemoteDataCollector
from shared.data.remote.samples import CollectorStats, Sample
from shared.data.remote.sender import MAX_MESSAGE_BYTES

__all__ = ["MAX_MESSAGE_BYTES", "CollectorStats", "RemoteDataCollector", "Sample"]
