"""Push a model's weights to every inference service it feeds; return when all have committed.

Per target the publisher remembers the version it last committed there and the per-tensor hashes
of that version. The next push to that target is a delta carrying only the tensors whose hash
changed; a target that answers that it lacks the base (it restarted, or someone else wrote) gets
a full push instead. Targets are addresses or DNS names; a name is resolved on every push to all
of its addresses, so new replicas behind one name are found and caught up with a full push.
"""

from __future__ import annotations

import logging
import random
import socket
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import grpc
import torch

from shared.grpc.auth import TlsFiles
from shared.weights.digest import model_digest, tensor_hash
from shared.weights.layout import TensorLayout
from shared.weights.writer import DEFAULT_CHUNK_BYTES, Payload
from trainer_service import metrics
from trainer_service.push import PushFailedError, PushPlan, SyncClient

logger = logging.getLogger(__name__)

BASE_MISSING = "base-version-mismatch"
FENCED = "fenced"
# Worth retrying: the target is unreachable, restarting, or cut the stream off.
RETRYABLE = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}
)


class SyncFailedError(Exception):
    """At least one inference service did not commit the new weights."""


class WriterFencedError(SyncFailedError):
    """Another trainer has taken this model over; this one must stop pushing it."""


@dataclass(frozen=True)
class SyncReport:
    """One publish: the version committed and the payload bytes it cost on the wire."""

    version: int
    payload_bytes: int
    targets: int


@dataclass
class _Acked:
    version: int
    hashes: dict[str, bytes]


class Publisher:
    """Streams versions of named models to a set of inference services."""

    def __init__(
        self,
        targets: Sequence[str],
        writer_id: str,
        *,
        timeout_s: float = 600.0,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        token: str | None = None,
        tls: TlsFiles | None = None,
        retries: int = 2,
        retry_delay_s: float = 0.2,
    ) -> None:
        self._retries = retries
        self._retry_delay_s = retry_delay_s
        self._token = token
        self._tls = tls
        self._targets = list(targets)
        self.writer_id = writer_id
        self._timeout_s = timeout_s
        self._chunk_bytes = chunk_bytes
        self._clients: dict[str, SyncClient] = {}
        self._acked: dict[tuple[str, str], _Acked] = {}
        self._versions: dict[str, int] = {}
        self._epochs: dict[tuple[str, str], int] = {}
        self._pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="push")

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        for client in self._clients.values():
            client.close()

    def version(self, model_name: str) -> int:
        """The last version of `model_name` this publisher pushed (0: none yet)."""
        return self._versions.get(model_name, 0)

    def publish(
        self, model_name: str, state: Mapping[str, torch.Tensor], *, full: bool = False
    ) -> SyncReport:
        """Push `state` as the next version of `model_name` to every target.

        Each target gets a delta on the last version it committed from this publisher when it
        can take one; `full` sends every tensor regardless (to re-seed targets whose weights
        are in doubt)."""
        started = time.perf_counter()
        tensors = {name: t.detach() for name, t in state.items()}
        clients = [self._client(address) for address in self._resolve()]
        if not clients:
            raise SyncFailedError(f"no inference service found at {', '.join(self._targets)}")
        if full:
            for client in clients:
                self._acked.pop((client.target, model_name), None)
        try:
            version = self._next_version(model_name, clients)
        except PushFailedError as error:
            raise SyncFailedError(
                f"model {model_name!r}: cannot read the served version: {error}"
            ) from None
        # Hash up front only when some target can take a delta (it needs the changed set);
        # a full push hashes each tensor while streaming it.
        hashes: dict[str, bytes] | None = None
        digest: bytes | None = None
        if any(self._delta_base(c.target, model_name, tensors) for c in clients):
            hashes = {name: tensor_hash(t) for name, t in tensors.items()}
            digest = model_digest({n: (TensorLayout.of(t), hashes[n]) for n, t in tensors.items()})
        futures = [
            self._pool.submit(self._push_one, c, model_name, version, tensors, hashes, digest)
            for c in clients
        ]
        errors = [e for f in futures if (e := f.exception()) is not None]
        failures = [str(e) for e in errors]
        if any(isinstance(e, PushFailedError) and e.reason == FENCED for e in errors):
            raise WriterFencedError(
                f"model {model_name!r}: another trainer has taken it over: " + "; ".join(failures)
            )
        sent = sum(f.result() for f in futures if f.exception() is None)
        # The version is spent even if some target missed it: the ones that committed it must
        # never be offered the same number again.
        self._versions[model_name] = version
        if failures:
            metrics.SYNC_FAILURES.labels(model_name).inc()
            raise SyncFailedError(
                f"model {model_name!r} version {version} was not committed everywhere: "
                + "; ".join(failures)
            )
        metrics.MODEL_VERSION.labels(model_name).set(version)
        metrics.SYNC_SECONDS.labels(model_name).observe(time.perf_counter() - started)
        logger.info(
            "model %s: version %d committed on %d inference service(s) in %.3fs",
            model_name,
            version,
            len(clients),
            time.perf_counter() - started,
        )
        return SyncReport(version, sent, len(clients))

    def _push_one(self, *args: Any) -> int:
        """One target's push, retried with capped exponential backoff and jitter while the
        target is unreachable (a restart, a dropped connection)."""
        delay = self._retry_delay_s
        for attempt in range(self._retries + 1):
            try:
                return self._push_once(*args)
            except PushFailedError as error:
                if error.code not in RETRYABLE or attempt == self._retries:
                    raise
                logger.info("%s (attempt %d); retrying in about %.1fs", error, attempt + 1, delay)
                time.sleep(delay * random.uniform(0.5, 1.5))
                delay = min(delay * 2, 5.0)
        raise AssertionError("unreachable")

    def _push_once(
        self,
        client: SyncClient,
        model_name: str,
        version: int,
        tensors: Mapping[str, torch.Tensor],
        hashes: dict[str, bytes] | None,
        digest: bytes | None,
    ) -> int:
        key = (client.target, model_name)
        if key not in self._epochs:  # first contact: become the writer (fences earlier ones)
            self._epochs[key] = client.acquire_writer(model_name, self.writer_id)
        epoch = self._epochs[key]
        acked = self._delta_base(client.target, model_name, tensors)
        # One cheap call first: it waits a little for a restarting target, and tells whether it
        # still serves our last version (else it restarted or someone else wrote: push in full).
        if client.get_model(model_name).version != (acked.version if acked else -1):
            acked = None
        plan = self._plan(model_name, version, epoch, tensors, hashes, digest, acked)
        try:
            self._push_counted(client, plan)
        except PushFailedError as error:
            if plan.base_version == 0 or error.reason != BASE_MISSING:
                raise
            logger.info(
                "%s lacks version %d of %s; pushing in full",
                client.target,
                plan.base_version,
                model_name,
            )
            plan = self._plan(model_name, version, epoch, tensors, hashes, digest, None)
            self._push_counted(client, plan)
        self._acked[(client.target, model_name)] = _Acked(
            version, plan.streamed_hashes if hashes is None else hashes
        )
        return plan.payload.nbytes

    @staticmethod
    def _push_counted(client: SyncClient, plan: PushPlan) -> None:
        kind = "full" if plan.base_version == 0 else "delta"
        try:
            client.push(plan)
        except PushFailedError as error:
            metrics.PUSHES.labels(plan.model_name, kind, error.code.name.lower()).inc()
            raise
        metrics.PUSHES.labels(plan.model_name, kind, "committed").inc()
        metrics.PUSH_BYTES.labels(plan.model_name, kind).inc(plan.payload.nbytes)

    def _delta_base(
        self, target: str, model_name: str, tensors: Mapping[str, torch.Tensor]
    ) -> _Acked | None:
        """What `target` last committed from us, if a delta on it can describe `tensors`."""
        acked = self._acked.get((target, model_name))
        return acked if acked is not None and acked.hashes.keys() == tensors.keys() else None

    def _plan(
        self,
        model_name: str,
        version: int,
        epoch: int,
        tensors: Mapping[str, torch.Tensor],
        hashes: dict[str, bytes] | None,
        digest: bytes | None,
        acked: _Acked | None,
    ) -> PushPlan:
        if acked is None or hashes is None:
            changed = list(tensors)
            base = 0
        else:
            changed = [name for name in tensors if acked.hashes[name] != hashes[name]]
            base = acked.version
        payload = Payload.of([(name, tensors[name]) for name in changed])
        return PushPlan(model_name, version, base, self.writer_id, payload, epoch, digest)

    def _next_version(self, model_name: str, clients: Sequence[SyncClient]) -> int:
        if model_name not in self._versions:
            remote = [c.get_model(model_name).version for c in clients]
            self._versions[model_name] = max(remote, default=0)
        return self._versions[model_name] + 1

    def _client(self, address: str) -> SyncClient:
        client = self._clients.get(address)
        if client is None:
            client = SyncClient(address, self._timeout_s, self._chunk_bytes, self._token, self._tls)
            self._clients[address] = client
        return client

    def _resolve(self) -> list[str]:
        """Every address of every target; a DNS name stands for all the hosts behind it."""
        addresses: list[str] = []
        for target in self._targets:
            host, _, port = target.rpartition(":")
            host = host.strip("[]")
            infos: list[tuple[object, ...]] = []
            for family in (socket.AF_INET, socket.AF_INET6):  # IPv4 first: "localhost" is one host
                try:
                    infos = list(socket.getaddrinfo(host, int(port), family, socket.SOCK_STREAM))
                except (OSError, ValueError):
                    continue
                if infos:
                    break
            if not infos:
                logger.warning("cannot resolve inference target %s", target)
            for info in infos:
                ip = str(info[4][0])  # type: ignore[index]
                address = f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"
                if address not in addresses:
                    addresses.append(address)
        return addresses
