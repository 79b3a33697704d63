"""The staging transaction: how a push fills a model's standby copy, then commits or aborts.

`ServedModel.begin_push()` hands a push a `StagingTransaction`: the model's single push slot,
and its standby copy (the module that is not live), drained of the requests that ran on it and
handed over. The push writes its bytes through the transaction (a sink, syncplane/staging.py),
has it bring the tensors it did not carry up to date from the live copy (`complete`), and
`commit()` swaps the copies. Leaving the transaction any other way (any failure) aborts it: the
live weights were never touched, the sink's copies in flight are waited for, and the standby's
bookkeeping says which of its tensors were written, so a later push brings those up to date
before they count. Either way the push slot is let go. A failed push changes nothing.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from torch import nn

from inference_service.module_state import buffer_names, state_of
from inference_service.syncplane.staging import Decode, make_sink
from shared.weights.layout import TensorEntry

if TYPE_CHECKING:
    from inference_service.served_model import Generation

# (the staged module, version, writer, hashes) -> (the generation it replaced, the new one)
Swap = Callable[[nn.Module, int, str, dict[str, bytes]], tuple["Generation", "Generation"]]


class Standby:
    """A model's standby copy between pushes: the module (made on the first push), what each of
    its tensors holds (a hash, or None: unknown, e.g. half written), and how many times each
    module has been handed to a push to overwrite: the hand-over counter.

    The counter is bumped under `lock`, which a copier of the live weights (the history writer,
    persistence.py) holds while it copies: one who sees the same count before and during a copy
    copied one version's bytes, and never pins the version."""

    def __init__(self) -> None:
        self.module: nn.Module | None = None
        self.hashes: dict[str, bytes | None] = {}
        self.lock = threading.Lock()
        self._handovers: dict[int, int] = {}

    def prepare(self, live: Generation) -> nn.Module:
        """The module a push fills: on the first push, a copy of the live one."""
        if self.module is None:
            self.module = copy.deepcopy(live.module)
            self._know(live)
        return self.module

    def _know(self, generation: Generation) -> None:
        """What the standby module holds: `generation`'s tensors, but for its buffers, which
        its forward may have written while it served (unknown: the next push brings them from
        the version it builds on)."""
        buffers = buffer_names(generation.module)
        self.hashes = {n: None if n in buffers else h for n, h in generation.hashes.items()}

    def hand_over(self, module: nn.Module) -> None:
        """Count `module` handed to a push, before its first byte is written."""
        with self.lock:
            self._handovers[id(module)] = self._handovers.get(id(module), 0) + 1

    def handovers(self, module: nn.Module) -> int:
        """How many times `module` has been handed over; read it holding `lock`."""
        return self._handovers.get(id(module), 0)

    def replace(self, generation: Generation) -> None:
        """After a swap: the generation that was live is the standby copy now."""
        self.module = generation.module
        self._know(generation)

    def drop(self) -> None:
        """Forget the standby copy (the live one was loaded anew); the next push copies it."""
        self.module = None
        self.hashes = {}


class StagingTransaction:
    """One push's hold on a model: see the module docstring. Use it as a context manager."""

    def __init__(
        self, live: Generation, standby: Standby, swap: Swap, release: Callable[[], None]
    ) -> None:
        assert standby.module is not None
        self._live = live
        self._standby = standby
        self._module = standby.module
        self._swap = swap
        self._release = release
        self._done = False
        self._sink = make_sink(state_of(self._module), self._first_write)

    def __enter__(self) -> StagingTransaction:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._done:
            self.abort()

    @property
    def live(self) -> Generation:
        """The generation the push builds on (live until `commit`: only a push swaps)."""
        return self._live

    def _first_write(self, name: str) -> None:
        self._standby.hashes[name] = None  # half written until `complete` says otherwise

    def write(self, entry: TensorEntry, offset: int, data: memoryview) -> None:
        """Write received tensor bytes into the standby copy (a TensorSink)."""
        self._sink.write(entry, offset, data)

    def decode(self, entry: TensorEntry, work: Decode) -> Callable[[], bytes]:
        """Decode an encoded tensor into the standby copy (see staging.CpuSink.decode and
        CudaSink.decode); what gives its hash, once written."""
        return self._sink.decode(entry, work)

    def complete(
        self, received: Mapping[str, bytes], tied: Mapping[str, str] | None = None
    ) -> dict[str, bytes]:
        """Bring every tensor the push did not carry up to date from the live copy, and wait
        for all copies; return the hashes of the state staged. `received`: the hashes of the
        tensors the push carried, as written, and of the names it declared `tied` to them
        (name -> the carried name), which get those tensors' bytes."""
        for name, source in (tied or {}).items():
            self._sink.tie(name, source)
        live = self._live
        hashes = self._standby.hashes
        live_state = live.committed
        for name in live.hashes.keys() - received.keys():
            if hashes.get(name) != live.hashes[name]:
                self._sink.copy(name, live_state[name])
                hashes[name] = live.hashes[name]
        self._sink.finish()
        hashes.update(received)
        return {**live.hashes, **received}

    def commit(self, version: int, writer_id: str, hashes: dict[str, bytes]) -> Generation:
        """Make the staged copy live as `version` (requests wait for one reference store); the
        copy that was live becomes the standby. Call it after `complete`, once."""
        assert not self._done
        old, new = self._swap(self._module, version, writer_id, hashes)
        self._standby.replace(old)
        self._done = True
        self._release()
        return new

    def abort(self) -> None:
        """Give the push up: nothing is swapped, no copy into the standby is left in flight."""
        if self._done:
            return
        self._done = True
        try:
            self._sink.finish()
        finally:
            self._release()
