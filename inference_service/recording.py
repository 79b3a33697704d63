"""Collection at the server: record what a model serves into a trainer's experience buffer.

Opt-in, per model or per request. A model the app declares with `record="buffer"` has the inputs
and outputs of every request it serves recorded into that buffer; a request may ask for it with
the OIP parameter `record: "buffer"` (a buffer the app declares). Each buffer tensor is the model
input or output of the same name; a model whose tensors all lead with a batch dimension (-1)
gives one sample per row, any other one sample per request.

The data plane hands a served request's tensors over after its answer is computed (`record`):
they go into a bounded queue and the answer leaves at once. A thread of the recorder's own
collects them with a RemoteDataCollector per buffer, a request's rows in one call
(`collect_rows`: one copy per tensor per batch of rows, not a Python call per row, so a request
of a million rows does not hold the GIL from the data plane's thread; where the collector's
queue is full it waits for a trainer that keeps taking samples, ROOM_WAIT_S), which streams them
to the trainer holding the buffer (`--experience`; the one that holds the buffer's trainer
group). The data plane never waits for a trainer: when the queue is full, or the trainer is
away (or acknowledges nothing for ROOM_WAIT_S) while the collector's own queue overflows, samples
are dropped and counted in
`weightsync_inference_recorded_dropped_total`.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import Counter

from shared.app import BufferSpec, ModelSpec, TensorSpec
from shared.data.remote import RemoteDataCollector
from shared.data.remote.route import check_credentials, split_addresses
from shared.errors import (
    BufferNotFoundError,
    ConfigurationError,
    InvalidArgumentError,
    UnsupportedError,
)
from shared.grpc.auth import TlsFiles

logger = logging.getLogger(__name__)

PARAMETER = "record"  # the OIP request parameter naming a buffer to record the request into
DEFAULT_QUEUE = 1024  # requests waiting to be recorded (--record-queue)
DEFAULT_QUEUE_BYTES = 64 << 20  # their tensor bytes (--record-queue-bytes)
# Recording a request of more rows than its collector's queue holds waits for the trainer to take
# them, as long as it acknowledges a batch at least this often (the requests behind it wait in the
# recording queue meanwhile); a trainer away is not waited for.
ROOM_WAIT_S = 5.0

RECORDED = Counter(
    "weightsync_inference_recorded_samples_total",
    "Samples recorded from served requests and handed to a buffer's collector, by buffer",
    ["buffer"],
)
DROPPED = Counter(
    "weightsync_inference_recorded_dropped_total",
    "Samples recorded from served requests and dropped, by buffer and cause: 'queue' (the "
    "recording queue was full, by requests or by bytes), 'trainer' (the trainer was away or "
    "slow and the collector's queue overflowed, or it refused them), 'shape' (the request's "
    "tensors do not have the sizes the buffer's samples hold)",
    ["buffer", "cause"],
)


@dataclass(frozen=True)
class Plan:
    """How one model's requests fill one buffer: for each buffer tensor, whether it is an
    output and its index among the model's inputs or outputs; `rows`: one sample per row."""

    model: str
    buffer: str
    columns: tuple[tuple[str, bool, int], ...]
    rows: bool
    # Each column's shape per sample in the buffer (-1: any size); a model's -1 may stand for
    # a size the buffer fixes, so each request's tensors are checked against these.
    # (Derived from the buffer, as `columns` are: left out of comparisons.)
    shapes: tuple[tuple[int, ...], ...] = field(default=(), compare=False)

    def tensors(self, inputs: Sequence[Any], outputs: Sequence[Any]) -> Recorded:
        """What a served request gives this plan: the buffer's tensors alone (the request's
        other inputs and outputs, a BYTES input say, are not kept), and its sample count."""
        tensors = {name: (outputs if out else inputs)[i] for name, out, i in self.columns}
        first = next(iter(tensors.values()))
        ndim = int(getattr(first, "ndim", 0))
        count = int(first.shape[0]) if self.rows and ndim else 1
        return Recorded(self, tensors, count)

    def misfit(self, recorded: Recorded) -> str | None:
        """Why `recorded`'s tensors do not make samples of the buffer (a size the buffer fixes
        differs), or None when they do (or the plan knows no shapes)."""
        if not self.shapes:
            return None
        for (name, _, _), want in zip(self.columns, self.shapes, strict=True):
            shape = tuple(int(d) for d in recorded.tensors[name].shape)
            have = shape[1:] if self.rows else shape
            if len(have) != len(want) or any(
                w not in (-1, h) for w, h in zip(want, have, strict=True)
            ):
                per = " per row" if self.rows else ""
                return (
                    f"tensor {name!r} is {list(have)}{per} but buffer {self.buffer!r} holds "
                    f"{list(want)}"
                )
        return None


@dataclass(frozen=True)
class Recorded:
    """A served request's tensors for one plan, waiting to be recorded, and its samples."""

    plan: Plan
    tensors: dict[str, Any]
    samples: int

    @property
    def nbytes(self) -> int:
        return sum(int(getattr(t, "nbytes", 0)) for t in self.tensors.values())


def plan(model: ModelSpec, buffer: BufferSpec) -> Plan:
    """How `model`'s requests fill `buffer`.

    Raises:
        InvalidArgumentError: The model's inputs and outputs do not hold the buffer's tensors.
    """
    rows = bool(model.inputs) and all(
        t.shape and t.shape[0] == -1 for t in (*model.inputs, *model.outputs)
    )
    found: dict[str, tuple[TensorSpec, bool, int]] = {}
    for is_output, tensors in ((False, model.inputs), (True, model.outputs)):
        for index, tensor in enumerate(tensors):
            found.setdefault(tensor.name, (tensor, is_output, index))
    where = f"model {model.name!r} cannot record into buffer {buffer.name!r}"
    columns = []
    for want in buffer.tensors:
        if want.name not in found:
            raise InvalidArgumentError(
                f"{where}: the buffer's samples hold {want.name!r}, which the model neither "
                "takes nor returns"
            )
        have, is_output, index = found[want.name]
        shape = have.shape[1:] if rows else have.shape
        fits = len(shape) == len(want.shape) and all(
            -1 in (a, b) or a == b for a, b in zip(shape, want.shape, strict=True)
        )
        if have.datatype != want.datatype or not fits:
            per = " per row" if rows else ""
            raise InvalidArgumentError(
                f"{where}: tensor {want.name!r} is {have.datatype}{list(shape)}{per} but the "
                f"buffer collects {want.datatype}{list(want.shape)}"
            )
        columns.append((want.name, is_output, index))
    shapes = tuple(tuple(want.shape) for want in buffer.tensors)
    return Plan(model.name, buffer.name, tuple(columns), rows, shapes)


class Recorder:
    """What the data plane calls: `plans` when a request arrives, `record` once it is served."""

    def __init__(
        self,
        models: Mapping[str, ModelSpec],
        buffers: Mapping[str, BufferSpec],
        trainers: Sequence[str] | None,
        *,
        token: str | None = None,
        tls: TlsFiles | None = None,
        server_name: str | None = None,
        max_queue: int = DEFAULT_QUEUE,
        max_queue_bytes: int = DEFAULT_QUEUE_BYTES,
        max_pending: int = 10_000,
        record_asked: bool = True,
    ) -> None:
        """Record requests of `models` into `buffers` of the trainers at `trainers` (their
        experience planes; None: recording is off), presenting `token`, over TLS with `tls`
        (verifying the trainers as `server_name` where the addresses name them otherwise);
        requests asking to be recorded (their `record` parameter) only with `record_asked`.

        Raises:
            ConfigurationError: A model declares recording into a buffer that the app does not
                declare, or that its inputs and outputs do not fill; or `token` or `tls` could
                serve no call (checked now, not at the first request recorded).
        """
        self._models = models
        self._buffers = buffers
        self._trainers = list(trainers) if trainers else None
        self._token = token
        self._tls = tls
        self._server_name = server_name
        self._max_pending = max_pending
        self._record_asked = record_asked
        self._declared: dict[str, tuple[Plan, ...]] = {}
        self._asked: dict[tuple[str, str], Plan] = {}
        for model in models.values():
            if model.record is None:
                continue
            if model.record not in buffers:
                known = ", ".join(sorted(buffers)) or "none"
                raise ConfigurationError(
                    f"model {model.name!r} records into buffer {model.record!r}, which the app "
                    f"does not declare (it declares: {known})"
                )
            try:
                self._declared[model.name] = (plan(model, buffers[model.record]),)
            except InvalidArgumentError as exc:
                raise ConfigurationError(str(exc)) from None
        if self._declared and self._trainers is None:
            logger.warning(
                "model(s) %s declare recording but --experience is not set: nothing is recorded",
                ", ".join(sorted(self._declared)),
            )
            self._declared.clear()
        self._queue: queue.Queue[tuple[list[Recorded], int] | None] = queue.Queue(max_queue)
        # The queue holds requests' tensors: bounded by their bytes too, not only their number.
        self._max_queue_bytes = max_queue_bytes
        self._queued_bytes = 0
        self._bytes_lock = threading.Lock()
        self._collectors: dict[str, RemoteDataCollector] = {}
        self._dropped_seen: dict[str, int] = {}
        self._misfits_logged: set[Plan] = set()  # plans a misfit request was logged for
        self._thread: threading.Thread | None = None
        if self._trainers is not None:
            try:
                split_addresses(self._trainers)
            except ValueError as exc:
                raise ConfigurationError(f"--experience: {exc}") from None
            check_credentials(self._trainers[0], token, tls, server_name)
            self._thread = threading.Thread(target=self._run, name="recording", daemon=True)
            self._thread.start()

    @classmethod
    def off(cls) -> Recorder:
        """A recorder that records nothing and refuses requests that ask for it."""
        return cls({}, {}, None)

    def plans(self, model: str, parameters: Mapping[str, Any]) -> tuple[Plan, ...]:
        """The buffers a request for `model` is recorded into: the model's own, and the one
        its `record` parameter names.

        Raises:
            UnsupportedError: The request asks for recording and recording is off here, or
                recording asked for is (`record_asked`).
            BufferNotFoundError: It names a buffer the app does not declare.
            InvalidArgumentError: The parameter is not a string, or the model's inputs and
                outputs do not fill the buffer it names.
        """
        declared = self._declared.get(model, ())
        if PARAMETER not in parameters:
            return declared
        asked = parameters[PARAMETER]
        if asked.WhichOneof("parameter_choice") != "string_param":
            raise InvalidArgumentError(
                f"parameter {PARAMETER!r} names a buffer to record the request into: give a string"
            )
        name = asked.string_param
        if self._trainers is None:
            raise UnsupportedError(
                f"this inference service records no requests (it has no --experience): cannot "
                f"record into buffer {name!r}"
            )
        if not self._record_asked:
            raise UnsupportedError(
                f"this inference service records only what its models declare (--record-asked "
                f"false): cannot record into buffer {name!r}"
            )
        if name not in self._buffers:
            known = ", ".join(sorted(self._buffers)) or "none"
            raise BufferNotFoundError(
                f"parameter {PARAMETER!r}: the app declares no buffer {name!r} (it declares: "
                f"{known})"
            )
        if any(p.buffer == name for p in declared):
            return declared
        key = (model, name)
        if key not in self._asked:
            self._asked[key] = plan(self._models[model], self._buffers[name])
        return (*declared, self._asked[key])

    def record(self, plans: tuple[Plan, ...], inputs: list[Any], outputs: list[Any]) -> None:
        """Queue the tensors a served request gives its plans (only those: what the queue
        holds is what its bytes bound counts); returns at once (a full queue, by requests or by
        bytes, drops the request's samples, counted; so does a plan whose buffer fixes sizes
        the request's tensors do not have, cause 'shape')."""
        recorded = []
        for p in plans:
            r = p.tensors(inputs, outputs)
            # Never handed to the collector: its first sample fixes the layout it takes.
            if (why := p.misfit(r)) is not None:
                DROPPED.labels(p.buffer, "shape").inc(r.samples)
                if p not in self._misfits_logged:
                    self._misfits_logged.add(p)
                    logger.warning(
                        "requests of %s are not recorded into %s when their sizes differ from "
                        "the buffer's (dropped, cause 'shape'): %s",
                        p.model,
                        p.buffer,
                        why,
                    )
                continue
            recorded.append(r)
        if not recorded:
            return
        size = sum(r.nbytes for r in recorded)
        with self._bytes_lock:
            fits = self._queued_bytes + size <= self._max_queue_bytes
            if fits:
                try:
                    self._queue.put_nowait((recorded, size))
                    self._queued_bytes += size
                except queue.Full:
                    fits = False
        if not fits:
            for r in recorded:
                DROPPED.labels(r.plan.buffer, "queue").inc(r.samples)

    def close(self, timeout: float = 5.0) -> None:
        """Record what is queued, give the collectors up to `timeout` seconds to deliver it,
        then stop."""
        if self._thread is None:
            return
        self._queue.put(None)
        self._thread.join(timeout)
        for collector in self._collectors.values():
            collector.close(timeout)
        self._count_trainer_drops()

    def _run(self) -> None:
        while True:
            try:
                item = self._queue.get(timeout=1.0)
            except queue.Empty:
                self._count_trainer_drops()
                continue
            if item is None:
                return
            recorded, size = item
            with self._bytes_lock:
                self._queued_bytes -= size
            for r in recorded:
                try:
                    self._collect(r)
                except Exception:  # one bad request must not stop recording
                    DROPPED.labels(r.plan.buffer, "trainer").inc(r.samples)
                    logger.exception(
                        "recording a request of %s into %s", r.plan.model, r.plan.buffer
                    )
            self._count_trainer_drops()

    def _collect(self, r: Recorded) -> None:
        assert self._trainers is not None
        p = r.plan
        collector = self._collectors.get(p.buffer)
        if collector is None:
            collector = RemoteDataCollector(
                self._trainers,
                p.buffer,
                token=self._token,
                tls=self._tls,
                server_name=self._server_name,
                max_pending=self._max_pending,
            )
            self._collectors[p.buffer] = collector
            self._dropped_seen[p.buffer] = 0
        try:
            if p.rows:  # every row at once: one copy per tensor per batch of rows
                collector.collect_rows(r.tensors, wait_s=ROOM_WAIT_S)
            else:
                collector.collect(r.tensors)
        except ValueError as exc:  # a shape that differs from the buffer's first sample
            DROPPED.labels(p.buffer, "trainer").inc(r.samples)
            logger.warning("not recorded into %s: %s", p.buffer, exc)
            return
        RECORDED.labels(p.buffer).inc(r.samples)

    def _count_trainer_drops(self) -> None:
        for name, collector in self._collectors.items():
            dropped = collector.stats.dropped
            if dropped > self._dropped_seen[name]:
                DROPPED.labels(name, "trainer").inc(dropped - self._dropped_seen[name])
                self._dropped_seen[name] = dropped
