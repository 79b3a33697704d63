"""One served model: the weights version that answers requests, and the copy a push fills.

Double buffering. `live` is the generation that answers requests; a push writes into the
standby copy, a second copy of the module, through the staging transaction `begin_push()` hands
it (syncplane/transaction.py), and its commit swaps the two by replacing one reference. A request
takes the live generation once, under a short lock, and runs wholly on it, so it never sees two
versions. Before a push writes into the standby copy (the previous live one) it waits for the
requests still running on it to finish. Memory: the model twice (plus small chunk buffers),
which lets a swap cost one pointer store however large the model is.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from inference_service import metrics
from inference_service.dataplane.model_io import to_model
from inference_service.lease import WriterLease
from inference_service.module_state import committed_state, state_of
from inference_service.syncplane.transaction import StagingTransaction, Standby
from shared.app import ModelSpec
from shared.errors import ConflictError, UnavailableError, VersionNotServedError
from shared.weights.digest import DigestTable, tensor_hashes
from shared.weights.layout import TensorLayout

InferenceProcedure = Callable[..., Any]


@dataclass(frozen=True)
class Generation:
    """An immutable snapshot: one module and the version of the weights it holds. `committed`:
    the module's state as the version committed it (module_state.committed_state), which a
    forward that writes the module's buffers leaves as it was; read a version's bytes there."""

    module: nn.Module
    version: int
    digest: bytes
    writer_id: str
    hashes: dict[str, bytes] = field(repr=False)
    committed_at: float = field(default_factory=time.time)
    committed: Mapping[str, torch.Tensor] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "committed", committed_state(self.module))


def _unshared(value: Any, weights: frozenset[int]) -> Any:
    """`value`, copied if it is a tensor whose bytes lie in one of `weights`."""
    if (
        isinstance(value, torch.Tensor)
        and value.layout is torch.strided  # (others are refused where outputs are encoded)
        and value.untyped_storage().data_ptr() in weights
    ):
        return value.clone()
    return value


def version_not_served(name: str, wanted: int | str, served: int) -> VersionNotServedError:
    """The error for a request that names a version other than the one being served."""
    return VersionNotServedError(
        f"model {name!r} version {wanted} is not served; version {served} is (leave the "
        "version empty for the latest)"
    )


@dataclass
class PendingPush:
    """What the sync plane reports about a push in progress."""

    writer_id: str
    version: int
    base_version: int
    payload_bytes: int
    bytes_received: int = 0
    writer_epoch: int = 0
    superseded_by: int = 0  # a newer push from the same writer ends this one (its version)


class ServedModel:
    """A model the inference service serves, and the lock-light machinery that swaps its weights."""

    def __init__(
        self,
        spec: ModelSpec,
        module: nn.Module,
        procedure: InferenceProcedure,
        accepts_pushes: bool,
        device: torch.device,
    ) -> None:
        self.spec = spec
        self.name = spec.name
        self.procedure = procedure
        self.accepts_pushes = accepts_pushes
        self.device = device
        module.eval().requires_grad_(False)
        state = state_of(module)
        self.layout = {k: TensorLayout.of(v) for k, v in state.items()}
        self._digests = DigestTable(self.layout)
        hashes = tensor_hashes(state)
        self._live = Generation(module, 0, self.digest_of(hashes), "", hashes)
        self._standby = Standby()
        # each copy's weight memory (run): a module that is dropped takes its entry along
        self._weights: weakref.WeakKeyDictionary[nn.Module, frozenset[int]]
        self._weights = weakref.WeakKeyDictionary()
        self._lock = threading.Condition()
        self._readers: dict[int, int] = {}
        self._push_lock = threading.Lock()
        self.pending: PendingPush | None = None
        self.lease = WriterLease(spec.name)  # the one writer allowed to push, by epoch

    @property
    def live(self) -> Generation:
        return self._live

    def digest_of(self, hashes: dict[str, bytes]) -> bytes:
        return self._digests.digest(hashes)

    # -- the request path ---------------------------------------------------------------------

    @contextmanager
    def acquire(self, version: int | None = None) -> Iterator[Generation]:
        """Pin the live generation for the duration of one request; with `version`, only if it
        is that version (checked under the same lock, so no push can slip between the two),
        else VersionNotServedError."""
        with self._lock:
            generation = self._live
            if version is not None and version != generation.version:
                raise version_not_served(self.name, version, generation.version)
            key = id(generation.module)
            self._readers[key] = self._readers.get(key, 0) + 1
        try:
            yield generation
        finally:
            with self._lock:
                self._readers[key] -= 1
                if self._readers[key] == 0:
                    self._lock.notify_all()

    def infer(self, inputs: Sequence[object], version: int | None = None) -> tuple[Any, Generation]:
        """Run the model's inference procedure on one generation (`version`, if given, else the
        live one); return its result and it."""
        with self.acquire(version) as generation:
            return self.run(generation, inputs), generation

    def run(self, generation: Generation, inputs: Sequence[object]) -> Any:
        """The inference procedure's result on `generation`, which the caller has pinned.

        Tensors, and numpy arrays of numbers as tensors of their own, go to the model's device
        (`model_io.to_model`); other inputs (BYTES arrays) are passed as they are.
        An output that shares memory with the weights (a procedure returning a parameter, or a
        view of one) is copied here, while they are pinned: the answer is encoded after they
        are let go, when a push may be writing the next version into that memory."""
        with torch.inference_mode():
            moved = [to_model(t, self.device) for t in inputs]
            result = self.procedure(generation.module, *moved)
            weights = self._weight_memory(generation.module)
            if isinstance(result, torch.Tensor):
                return _unshared(result, weights)
            if isinstance(result, (tuple, list)):
                return type(result)(_unshared(t, weights) for t in result)
            return result

    def _weight_memory(self, module: nn.Module) -> frozenset[int]:
        """Where the tensors of `module` (one of the two copies) keep their bytes. Pushes write
        into those tensors in place, so this holds for as long as the module does."""
        found = self._weights.get(module)
        if found is None:
            found = frozenset(t.untyped_storage().data_ptr() for t in state_of(module).values())
            self._weights[module] = found
        return found

    # -- the push path ---------------------------------------------------------------------

    def begin_push(
        self, pending: PendingPush, drain_timeout_s: float, wait_s: float = 0.0
    ) -> StagingTransaction:
        """Take the model's single push slot (waiting up to `wait_s` for a push that is being
        ended) and the standby copy, once the requests on it have finished (up to
        `drain_timeout_s`): the transaction the push stages its bytes in, then commits or
        aborts. ConflictError while another push holds the slot."""
        if not self._push_lock.acquire(timeout=wait_s):
            other = self.pending
            who = f" from {other.writer_id!r} (version {other.version})" if other else ""
            raise ConflictError(f"model {self.name!r}: another push{who} is in progress")
        try:
            self.pending = pending
            standby = self._standby.prepare(self._live)
            with self._lock:
                drained = self._lock.wait_for(
                    lambda: self._readers.get(id(standby), 0) == 0, timeout=drain_timeout_s
                )
            if not drained:
                raise UnavailableError(
                    f"model {self.name!r}: requests on the previous weights did not finish "
                    f"within {drain_timeout_s:g}s; retry the push"
                )
            self._standby.hand_over(standby)
            return StagingTransaction(self._live, self._standby, self._swap, self._end_push)
        except BaseException:
            self._end_push()
            raise

    def _end_push(self) -> None:
        self.pending = None
        self._push_lock.release()

    def _swap(
        self, module: nn.Module, version: int, writer_id: str, hashes: dict[str, bytes]
    ) -> tuple[Generation, Generation]:
        """Make `module` live as `version`; return the generation it replaced, and its own."""
        generation = Generation(module, version, self.digest_of(hashes), writer_id, hashes)
        with self._lock:  # the only moment requests wait on a push: one reference store
            held = time.perf_counter()
            old = self._live
            self._live = generation
            held = time.perf_counter() - held
        metrics.SWAP_SECONDS.labels(self.name).observe(held)
        return old, generation

    def snapshot(self) -> tuple[Generation, int]:
        """The live generation and a count to hand `unchanged` while copying it, unpinned."""
        with self._standby.lock:
            live = self._live
            return live, self._standby.handovers(live.module)

    @contextmanager
    def unchanged(self, generation: Generation, count: int) -> Iterator[bool]:
        """Whether no push has started overwriting `generation` since `snapshot` gave `count`;
        while true, none can start until the block ends (keep it to one short copy)."""
        with self._standby.lock:
            yield self._standby.handovers(generation.module) == count

    def restore(
        self,
        tensors: Mapping[str, torch.Tensor],
        version: int,
        writer_id: str,
        hashes: dict[str, bytes],
        committed_at: float,
    ) -> None:
        """Load stored weights into the live copy before serving starts (no request can run)."""
        state = state_of(self._live.module)
        for name, tensor in tensors.items():
            state[name].copy_(tensor)
        self._live = Generation(
            self._live.module, version, self.digest_of(hashes), writer_id, hashes, committed_at
        )
        self._standby.drop()
