"""One push to one inference service's sync plane: header, payload chunks, commit; a push whose
stream takes nothing for the stall timeout is cancelled."""

from __future__ import annotations

from dataclasses import dataclass, field

import grpc

from shared.gen.weightsync.v1 import weightsync_pb2 as pb
from shared.gen.weightsync.v1 import weightsync_pb2_grpc as pb_grpc
from shared.grpc.auth import TlsFiles
from shared.grpc.channel import open_channel
from shared.grpc.errors import error_details, error_reason
from shared.grpc.options import (
    SYNC_MAX_ANSWER_BYTES,
    SYNC_MAX_MESSAGE_BYTES,
    watch_timeout_s,
    watched_link,
)
from shared.grpc.prefetch import prefetched
from shared.weights.digest import DigestTable
from shared.weights.writer import DEFAULT_CHUNK_BYTES, Payload
from trainer_service.progress import Progress, wants_progress
from trainer_service.push_messages import push_header, requests
from trainer_service.push_watch import AppliedWatch, Watched
from trainer_service.stopping import Stopping


@dataclass(frozen=True)
class Hop:
    """A replica a push is passed on to, down its route: the address dialled, the name its TLS
    certificate must carry ("": the address's host) and the writer epoch held there."""

    address: str
    server_name: str
    writer_epoch: int


@dataclass(frozen=True)
class HopResult:
    """What became of a push on one hop of its route: the version committed there (0: none),
    else the status it failed with."""

    address: str
    version: int
    code: grpc.StatusCode
    reason: str
    message: str

    def error(self) -> PushFailedError:
        """The failure as the error a direct push to the hop would have raised."""
        cls = TargetUnreachableError if self.code in UNREACHABLE else PushFailedError
        return cls(self.address, self.code, self.message, self.reason or None)


@dataclass(frozen=True)
class PushAnswer:
    """What the target answered a committed push with: what became of it on each hop of its
    route, and how long the target took from the push's last message to its answer
    (PushResponse.finish_seconds; 0 where it does not say): the push's seconds less these are
    its stream's."""

    hops: tuple[HopResult, ...]
    finish_s: float


@dataclass(frozen=True)
class PushPlan:
    """Everything one push sends."""

    model_name: str
    version: int
    base_version: int
    writer_id: str
    payload: Payload
    writer_epoch: int
    # The digest of the state after the push; None: hash the tensors that `streamed_hashes`
    # lacks while streaming them (those of a full push, those a delta carries that were not
    # hashed up front), fill it in, and digest the state laid out as `table` from it.
    digest: bytes | None
    streamed_hashes: dict[str, bytes] = field(default_factory=dict)
    table: DigestTable | None = None
    # Replicas the receiver passes the push on to, in order (see docs/sync.md).
    route: tuple[Hop, ...] = ()


@dataclass(frozen=True)
class Pushed:
    """A push the target committed: the payload bytes it cost, and what became of it on each
    hop of its route (a hop missing from the end was not reached)."""

    nbytes: int
    hops: tuple[HopResult, ...] = ()


@dataclass(frozen=True)
class RemoteModel:
    """What an inference service says it serves for one model."""

    version: int
    digest: bytes
    writer_id: str
    accepts_pushes: bool
    instance_id: str = ""  # the service's instance (the same at every address it is reached by)


class PushFailedError(Exception):
    """A push to one target failed; `code` and `reason` say how."""

    def __init__(self, target: str, code: grpc.StatusCode, details: str, reason: str | None):
        super().__init__(f"{target}: {code.name}: {details}")
        self.target = target
        self.code = code
        self.details = details
        self.reason = reason

    @classmethod
    def from_rpc(cls, target: str, error: grpc.RpcError) -> PushFailedError:
        code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
        details = error_details(error, pb.DESCRIPTOR.services_by_name["WeightSync"].full_name)
        return cls(target, code, details, error_reason(error))


class TargetUnreachableError(PushFailedError):
    """The push never reached the target, or stopped reaching it: no answer within the connect
    deadline (down, restarting, unroutable, its TLS handshake failed), a stream that took
    nothing for the stall timeout, or a link that went dark mid-push."""


# What a call that never reached the target ends with.
UNREACHABLE = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}
)
CODES = {code.value[0]: code for code in grpc.StatusCode}
# How long a push's stream may take nothing before the push is cancelled (the target lags), and
# how often that is looked at.
DEFAULT_STALL_TIMEOUT_S = 3.0
WATCH_TICK_S = 0.1
# A channel to a target that went away retries its connection with exponential backoff; cap it
# well under a connect deadline, so that a probe of a target that came back finds it.
RECONNECT_OPTIONS: list[tuple[str, int | str]] = [
    ("grpc.initial_reconnect_backoff_ms", 250),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


class SyncClient:
    """A channel to one inference service's sync plane.

    `target` is the address dialled; over TLS the service's certificate is verified against
    `server_name` when given (the host name the user wrote, which `target` was resolved from),
    else against `target` itself."""

    def __init__(
        self,
        target: str,
        timeout_s: float,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        token: str | None = None,
        tls: TlsFiles | None = None,
        server_name: str | None = None,
        stall_timeout_s: float = DEFAULT_STALL_TIMEOUT_S,
        stopping: Stopping | None = None,
    ):
        self.target = target
        self._stopping = stopping
        self.server_name = server_name or ""
        self._timeout_s = timeout_s
        self._stall_timeout_s = stall_timeout_s
        self._chunk_bytes = chunk_bytes
        secure = tls is not None and tls.enabled
        # A push's answer comes only once the service committed it, and a Seed's once the whole
        # seeded push is done: nothing flows on such a call once its messages have left, so the
        # link under it is watched (a ping every quarter of the stall timeout), and a service
        # that went dark or stopped (its host, with its sync relay) fails it UNAVAILABLE instead
        # of holding the sync up to the push deadline.
        self._channel = open_channel(
            target,
            SYNC_MAX_MESSAGE_BYTES,
            token=token,
            tls=tls if secure else None,
            server_name=server_name if secure else None,  # plaintext: nothing to verify
            options=[*RECONNECT_OPTIONS, *watched_link(stall_timeout_s)],
            max_answer_bytes=SYNC_MAX_ANSWER_BYTES,
        )
        self._stub = pb_grpc.WeightSyncStub(self._channel)
        self._seeds = open_channel(
            target,
            SYNC_MAX_MESSAGE_BYTES,
            token=token,
            tls=tls if secure else None,
            server_name=server_name if secure else None,
            options=[*RECONNECT_OPTIONS, *watched_link(stall_timeout_s)],
            max_answer_bytes=SYNC_MAX_ANSWER_BYTES,
        )
        # Push sends messages we serialize ourselves (shared/weights/wire.py).
        self._push = self._channel.stream_unary(
            "/weightsync.v1.WeightSync/Push",
            request_serializer=None,
            response_deserializer=pb.PushResponse.FromString,
        )

    def close(self) -> None:
        self._channel.close()
        self._seeds.close()

    def answers(self, name: str, within_s: float) -> bool:
        """Whether the target answers a look at the model `name` over this trainer's own link
        within `within_s`, or the time the link's watch gives a ping's answer where that is
        shorter (a link that does not is dark): False only when it does not answer at all
        (refused, dark, stopped), whatever it answers otherwise."""
        bound_s = min(within_s, watch_timeout_s(self._stall_timeout_s))
        try:
            self.get_model(name, bound_s, wait_for_ready=False)
        except TargetUnreachableError:
            return False
        except PushFailedError:
            pass  # it answered, with a refusal
        return True

    def get_model(
        self, name: str, connect_timeout_s: float = 3.0, wait_for_ready: bool = True
    ) -> RemoteModel:
        """What the target serves; waits up to `connect_timeout_s` for the channel (it may be
        restarting; without `wait_for_ready`, a connection refused fails at once).
        TargetUnreachableError when it does not answer in that time."""
        try:
            state = self._stub.GetModel(
                pb.GetModelRequest(model_name=name),
                timeout=min(self._timeout_s, connect_timeout_s),
                wait_for_ready=wait_for_ready,
            )
        except grpc.RpcError as error:
            failed = PushFailedError.from_rpc(self.target, error)
            if failed.code in UNREACHABLE:
                raise TargetUnreachableError(
                    self.target, failed.code, failed.details, failed.reason
                ) from None
            raise failed from None
        return RemoteModel(
            state.version, state.digest, state.writer_id, state.accepts_pushes, state.instance_id
        )

    def acquire_writer(self, name: str, writer_id: str) -> int:
        """Become the model's only writer on this target; return the epoch to push under."""
        try:
            lease = self._stub.AcquireWriter(
                pb.AcquireWriterRequest(model_name=name, writer_id=writer_id),
                timeout=min(self._timeout_s, 10.0),
                wait_for_ready=True,
            )
        except grpc.RpcError as error:
            raise PushFailedError.from_rpc(self.target, error) from None
        return int(lease.epoch)

    def seed(self, name: str, version: int, hop: Hop) -> HopResult:
        """Ask this service to push `version` of `name`, which it must serve, to the replica
        `hop` (a Seed): what became of it there. PushFailedError when this service refuses or
        cannot be reached."""
        request = pb.SeedRequest(
            model_name=name,
            version=version,
            hop=pb.Hop(
                address=hop.address, server_name=hop.server_name, writer_epoch=hop.writer_epoch
            ),
        )
        self._check_stopping()
        call = pb_grpc.WeightSyncStub(self._seeds).Seed.future(request, timeout=self._timeout_s)
        while True:
            try:
                result: pb.HopResult = call.result(timeout=WATCH_TICK_S)
                break
            except grpc.RpcError as error:
                raise PushFailedError.from_rpc(self.target, error) from None
            except grpc.FutureTimeoutError:
                self._cut_if_stopping(call)
        return HopResult(
            result.address,
            result.version,
            CODES.get(result.code, grpc.StatusCode.UNKNOWN),
            result.reason,
            result.message,
        )

    def push(self, plan: PushPlan) -> PushAnswer:
        """Stream one push (the target committed it unless this raises); return what became of
        it on each hop of its route, and the target's own time after its end. A push whose
        stream takes nothing for the stall timeout (the link went dark, the service is stuck) is
        cancelled: TargetUnreachableError, as is one the trainer cuts as it stops (stopping.py)."""
        self._check_stopping()
        try:
            progress = None
            if wants_progress(plan.payload.nbytes):
                kind = "full" if plan.base_version == 0 else f"delta on {plan.base_version}"
                label = f"{plan.model_name} v{plan.version} ({kind}) -> {self.target}"
                progress = Progress(label, plan.payload.nbytes)
            with prefetched(requests(plan, self._chunk_bytes, progress), "push-send") as messages:
                response = self._watched(Watched(messages), push_header(plan))
        except grpc.RpcError as error:
            raise PushFailedError.from_rpc(self.target, error) from None
        except grpc.FutureCancelledError:
            raise PushFailedError(
                self.target, grpc.StatusCode.CANCELLED, "the push was cancelled", None
            ) from None
        if (response.model_name, response.version) != (plan.model_name, plan.version):
            # A sync plane answers a push with what it committed (an empty answer: version 0).
            raise PushFailedError(
                self.target,
                grpc.StatusCode.INTERNAL,
                f"answered the push of {plan.model_name!r} version {plan.version} with "
                f"{response.model_name!r} version {response.version}: not a commit of it",
                None,
            )
        hops = tuple(
            HopResult(
                h.address,
                h.version,
                CODES.get(h.code, grpc.StatusCode.UNKNOWN),
                h.reason,
                h.message,
            )
            for h in response.hops
        )
        return PushAnswer(hops, response.finish_seconds)

    def _cut_if_stopping(self, call: grpc.Future) -> None:
        """Cancel `call` if the trainer is stopping and its pushes' time is up (raising)."""
        if self._stopping is not None and self._stopping.cut() and not call.done():
            call.cancel()
            self._check_stopping()

    def _check_stopping(self) -> None:
        if self._stopping is not None and self._stopping.cut():
            raise TargetUnreachableError(
                self.target,
                grpc.StatusCode.CANCELLED,
                f"the trainer is stopping and its pushes had {self._stopping.bound_s:g}s "
                "(--stop-sync-timeout-s): this one was cancelled; the service keeps the version "
                "it serves",
                None,
            )

    def _watched(self, messages: Watched, header: pb.PushHeader) -> pb.PushResponse:
        """The push's response; cancelled once its stream took nothing for the stall timeout,
        or, once it left whole, its service applied nothing more of it for as long
        (push_watch.py). A push whose link the channel's watch dropped while its stream took
        nothing (gone dark mid-push) fails as a stalled one does, TargetUnreachableError: it
        lags at once. A connection that broke while the stream flowed is retried (and resumed)
        by the caller."""
        call = self._push.future(messages, timeout=self._timeout_s)
        dark_s = watch_timeout_s(self._stall_timeout_s) / 2
        request = pb.GetModelRequest(model_name=header.model_name)
        applied = AppliedWatch(
            header,
            lambda bound_s: self._stub.GetModel(request, timeout=bound_s),
            self._stall_timeout_s,
        )
        while True:
            try:
                response: pb.PushResponse = call.result(timeout=WATCH_TICK_S)
                return response
            except grpc.RpcError as error:
                if error.code() is not grpc.StatusCode.UNAVAILABLE or messages.held_s() < dark_s:
                    raise
                raise TargetUnreachableError(
                    self.target,
                    grpc.StatusCode.UNAVAILABLE,
                    f"the push's link answered nothing while its stream took nothing for "
                    f"{messages.held_s():.1f}s (its link went dark, or its host stopped): "
                    f"{error.details()}",
                    None,
                ) from None
            except grpc.FutureTimeoutError:
                self._cut_if_stopping(call)
                left_s = messages.left_s()
                if left_s is not None:
                    stuck = applied.stuck(left_s)
                    if stuck is None or call.done():
                        continue  # an answer that came meanwhile stands
                    call.cancel()
                    code, why = stuck
                    raise TargetUnreachableError(
                        self.target, code, f"{why}; it was cancelled", None
                    ) from None
                if messages.held_s() < self._stall_timeout_s:
                    continue
                call.cancel()
                raise TargetUnreachableError(
                    self.target,
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    f"the push took nothing for {self._stall_timeout_s:g}s (its link is cut, or "
                    "the service is stuck); it was cancelled",
                    None,
                ) from None
