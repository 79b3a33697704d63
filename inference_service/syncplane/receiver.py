"""Apply one push: check it, stage it into the standby copy, verify the digest, swap.

Order of checks: the header against the model (exists, accepts pushes, the writer's epoch,
newer version, base held, size limit); the safetensors header against the model's tensors (names,
dtypes, shapes, offsets); the byte count; the digest of the resulting state; the writer's epoch
once more, under the lease's lock, as the swap happens. Only when all pass does the swap happen,
so a push that fails for any reason (including a sender that dies or stalls mid-stream, or a
writer fenced while it streams) leaves the served weights exactly as they were.

Whatever transport brings a push hands its messages over through an `Inbox`, which ends a push
that sends nothing for the idle timeout, and one whose writer another has fenced meanwhile.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

from inference_service import metrics
from inference_service.lease import COUNTER_LIMIT, check_counter
from inference_service.persistence import StoredVersion, WeightStore
from inference_service.served_model import Generation, PendingPush, ServedModel
from inference_service.syncplane.inbox import Inbox
from inference_service.syncplane.staging import make_sink
from shared.errors import (
    BaseVersionMismatchError,
    ConflictError,
    InferenceOnlyModelError,
    MalformedPushError,
    ModelNotFoundError,
    OutOfRangeError,
    PushRejectedError,
    ResourceLimitError,
)
from shared.weights.reader import PayloadReader

logger = logging.getLogger(__name__)

# How long a push waits for the model's push slot when the push holding it has been fenced
# (it notices within a tick, or at its next message, and lets go).
ENDING_PUSH_WAIT_S = 2.0


@dataclass(frozen=True)
class PushHeader:
    model_name: str
    version: int
    base_version: int
    writer_id: str
    payload_bytes: int
    writer_epoch: int = 0


@dataclass(frozen=True)
class Commit:
    digest: bytes


@dataclass(frozen=True)
class SyncLimits:
    max_payload_bytes: int = 64 << 30
    max_header_bytes: int = 16 << 20
    drain_timeout_s: float = 30.0
    max_concurrent: int = 8
    # Receive weights no faster than this (bytes/s; 0: as fast as they come). Spreading a
    # push's CPU cost over time keeps it from showing in the data plane's tail latency.
    max_bytes_per_s: float = 0.0
    # A push that sends nothing for this long is ended (DEADLINE_EXCEEDED), freeing the model.
    push_idle_timeout_s: float = 5.0


class PushReceiver:
    """The sync plane's use-case layer: models by name, and the push procedure."""

    def __init__(
        self,
        models: Mapping[str, ServedModel],
        limits: SyncLimits,
        on_commit: Callable[[str], None] | None = None,
        store: WeightStore | None = None,
    ) -> None:
        self._models = models
        self._limits = limits
        self._on_commit = on_commit
        self.store = store

    def model(self, name: str) -> ServedModel:
        model = self._models.get(name)
        if model is None:
            known = ", ".join(sorted(self._models)) or "none"
            raise ModelNotFoundError(f"no model named {name!r} is served here (served: {known})")
        return model

    @property
    def models(self) -> Mapping[str, ServedModel]:
        return self._models

    def inbox(self, messages: Iterator[bytes | memoryview | None]) -> Inbox:
        """An Inbox over a transport's messages, with this service's idle timeout."""
        return Inbox(messages, self._limits.push_idle_timeout_s)

    def receive(
        self,
        header: PushHeader,
        parts: Iterable[memoryview | bytes | Commit],
        inbox: Inbox | None = None,
    ) -> Generation:
        """Apply one push; `inbox`, the stream `parts` come from, is watched while it waits."""
        model = self.model(header.model_name)
        try:
            generation = self._receive(model, header, parts, inbox)
        except Exception:
            metrics.PUSHES.labels(model.name, "rejected").inc()
            raise
        metrics.PUSHES.labels(model.name, "committed").inc()
        metrics.PUSH_BYTES.labels(model.name).inc(header.payload_bytes)
        metrics.MODEL_VERSION.labels(model.name).set(generation.version)
        return generation

    def _receive(
        self,
        model: ServedModel,
        header: PushHeader,
        parts: Iterable[memoryview | bytes | Commit],
        inbox: Inbox | None,
    ) -> Generation:
        self._check_header(model, header)
        started = time.perf_counter()
        pending = PendingPush(
            header.writer_id,
            header.version,
            header.base_version,
            header.payload_bytes,
            writer_epoch=header.writer_epoch,
        )
        lease = model.lease
        if inbox is not None:
            inbox.watch(
                lambda: lease.check(header.writer_epoch, header.writer_id),
                f" of {model.name!r} version {header.version} from {header.writer_id!r}",
            )
        other = model.pending  # a push being ended for a fenced writer lets go of the model soon
        wait = ENDING_PUSH_WAIT_S if other and other.writer_epoch != lease.epoch else 0.0
        with model.writing(pending, self._limits.drain_timeout_s, wait) as standby:
            self._check_versions(model, header)  # again: a push may have committed meanwhile
            targets = standby.state_dict()
            sink = make_sink(targets, lambda name: model.mark_standby(name, None))
            reader = PayloadReader(
                header.payload_bytes, model.layout, sink, self._limits.max_header_bytes
            )
            digest = self._stream_into(reader, parts, pending)
            received = reader.finish()
            if header.base_version == 0 and len(received) != len(model.layout):
                missing = sorted(set(model.layout) - set(received))
                raise MalformedPushError(
                    f"a full push must carry every tensor; missing: {', '.join(missing[:10])}"
                )
            live = model.live
            hashes = {**live.hashes, **received}
            live_state = live.module.state_dict()
            for name in model.layout.keys() - received.keys():
                if not model.standby_tensor_is_current(name):
                    sink.copy(name, live_state[name])
                    model.mark_standby(name, live.hashes[name])
            sink.finish()
            expected = model.digest_of(hashes)
            if digest != expected:
                raise MalformedPushError(
                    f"digest mismatch for {model.name!r} version {header.version}: the commit "
                    f"says {digest.hex()} but the weights received hash to {expected.hex()}; "
                    "nothing was swapped"
                )
            for name, tensor_digest in received.items():
                model.mark_standby(name, tensor_digest)
            # Under the lease's lock: a grant lands wholly before this check or after the swap.
            with lease.fenced(header.writer_epoch, header.writer_id):
                generation = model.commit(header.version, header.writer_id, hashes)
        metrics.PUSH_SECONDS.labels(model.name).observe(time.perf_counter() - started)
        if self._on_commit is not None:
            self._on_commit(model.name)
        logger.info(
            "model %s: committed version %d from %s (%s, %d tensors, %d bytes, %.3fs)",
            model.name,
            header.version,
            header.writer_id,
            "full" if header.base_version == 0 else f"delta on {header.base_version}",
            len(received),
            header.payload_bytes,
            time.perf_counter() - started,
        )
        return generation

    def acquire_writer(self, name: str, writer_id: str) -> int:
        """Make `writer_id` the only writer of `name`; earlier writers are fenced from now on."""
        model = self.model(name)
        if not model.accepts_pushes:
            raise InferenceOnlyModelError(
                f"model {model.name!r} is inference-only: it has no writer"
            )
        epoch = model.lease.grant(writer_id)
        logger.info("model %s: %s is the writer now (epoch %d)", name, writer_id, epoch)
        return epoch

    def versions(self, name: str) -> list[StoredVersion]:
        """The versions of `name` kept on disk, newest first."""
        self.model(name)
        return self._history().versions(name)

    def rollback(self, name: str, to_version: int) -> Generation:
        """Serve stored version `to_version` again, committed as the next version."""
        check_counter("to_version", to_version)
        model = self.model(name)
        stored = self._history().find(name, to_version)
        version = model.live.version + 1
        if version >= COUNTER_LIMIT:
            raise OutOfRangeError(
                f"model {name!r} serves version {version - 1}, the last below 2^63: no version "
                "can follow it"
            )
        header = PushHeader(
            name,
            version,
            0,
            f"rollback to {to_version} of {stored.writer_id or 'unknown'}",
            stored.size_bytes,
            model.lease.epoch,
        )
        return self.receive(header, itertools.chain(stored.chunks(), [Commit(stored.digest)]))

    def _history(self) -> WeightStore:
        if self.store is None:
            raise PushRejectedError(
                "this inference service keeps no version history: start it with --state-dir"
            )
        return self.store

    def _check_header(self, model: ServedModel, header: PushHeader) -> None:
        if not model.accepts_pushes:
            raise InferenceOnlyModelError(
                f"model {model.name!r} is inference-only: it serves its pretrained weights and "
                "refuses pushes"
            )
        if header.payload_bytes > self._limits.max_payload_bytes:
            raise ResourceLimitError(
                f"push of {header.payload_bytes} bytes exceeds the "
                f"{self._limits.max_payload_bytes}-byte limit"
            )
        self._check_versions(model, header)

    @staticmethod
    def _check_versions(model: ServedModel, header: PushHeader) -> None:
        model.lease.check(header.writer_epoch, header.writer_id)  # a push never moves the lease
        live = model.live
        if header.version <= live.version:
            writer = f" (written by {live.writer_id!r})" if live.writer_id else ""
            raise ConflictError(
                f"model {model.name!r}: version {header.version} is not newer than the served "
                f"version {live.version}{writer}"
            )
        if header.base_version not in (0, live.version):
            raise BaseVersionMismatchError(
                f"model {model.name!r}: the delta applies to version {header.base_version} but "
                f"version {live.version} is served; push the full weights"
            )

    def _stream_into(
        self,
        reader: PayloadReader,
        parts: Iterable[memoryview | bytes | Commit],
        pending: PendingPush,
    ) -> bytes:
        rate = self._limits.max_bytes_per_s
        started = time.monotonic()
        for part in parts:
            if isinstance(part, Commit):
                return part.digest
            reader.feed(part)
            pending.bytes_received = reader.received
            if rate:  # ahead of the allowed rate: wait (HTTP/2 flow control slows the sender)
                ahead = reader.received / rate - (time.monotonic() - started)
                if ahead > 0:
                    time.sleep(ahead)
        raise MalformedPushError(
            f"the push stream ended after {reader.received} payload bytes without a commit"
        )
