"""The inference services a trainer feeds: what each holds of each model (`Target`), and the
set of them the trainer's target names resolve to now (`Targets`; names.py resolves them).
"""

from __future__ import annotations

import contextlib
import logging
import random
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from trainer_service import metrics
from trainer_service.names import Endpoint, Lookups, resolve
from trainer_service.push import PushFailedError, RemoteModel, SyncClient, TargetUnreachableError

logger = logging.getLogger(__name__)

# How soon a lagging target is tried again: doubling from the first, never longer than the cap.
RETRY_FIRST_S = 0.5
RETRY_CAP_S = 10.0


@dataclass(frozen=True)
class Snapshot:
    """A version of a model as it was published, kept to catch lagging targets up with."""

    version: int
    tensors: Mapping[str, torch.Tensor]
    hashes: dict[str, bytes] | None


@dataclass(eq=False)
class Target:
    """One model at one inference service: everything the publisher knows of it.

    `lock` is held for the whole of any exchange with the target about the model, so the sync
    and the background catch-up never push to it at once."""

    client: SyncClient
    model: str
    epoch: int | None = None  # the writer lease held there; None: acquire it on next contact
    version: int = 0  # the last version it acknowledged from this publisher (0: none)
    hashes: dict[str, bytes] | None = None  # the per-tensor hashes of that version
    lagging_since: float | None = None
    retry_at: float = 0.0
    retry_delay_s: float = 0.0
    catching_up: bool = False  # a catch-up task holds it or is queued for it
    instance: str | None = None  # the service's instance id, once it answered (None: not yet)
    alias_of: str | None = None  # the address this service is fed through instead, if another
    forgotten: bool = False  # its address is no longer named: its client is being closed
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def address(self) -> str:
        return self.client.target

    @property
    def lagging(self) -> bool:
        return self.lagging_since is not None

    def delta_base(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, bytes] | None:
        """The hashes of what it last acknowledged, if a delta on that can describe
        `tensors`."""
        hashes = self.hashes
        return hashes if hashes is not None and hashes.keys() == tensors.keys() else None

    def acknowledged(self, version: int, hashes: dict[str, bytes]) -> None:
        self.version, self.hashes = version, hashes
        metrics.TARGET_VERSION.labels(self.model, self.address).set(version)

    def fall_behind(self, error: PushFailedError | str) -> None:
        """It missed a version: the background catch-up tries it again after a capped,
        growing delay."""
        now = time.monotonic()
        self.retry_delay_s = min(max(self.retry_delay_s * 2, RETRY_FIRST_S), RETRY_CAP_S)
        self.retry_at = now + self.retry_delay_s * random.uniform(0.5, 1.0)
        if self.lagging_since is None:
            self.lagging_since = now
            metrics.TARGET_LAGGING.labels(self.model, self.address).set(1)
            logger.warning(
                "model %s: inference service %s %s, so it lags at version %d; "
                "the others are fed and it is caught up in the background: %s",
                self.model,
                self.address,
                "is unreachable"
                if isinstance(error, TargetUnreachableError)
                else "missed a version",
                self.version,
                error,
            )

    def caught_up(self, donor: str | None = None) -> None:
        """It holds the newest version (pushed by the trainer, or by `donor`, another target)."""
        if self.lagging_since is not None:
            logger.info(
                "model %s: inference service %s caught up%s at version %d after %.1fs behind",
                self.model,
                self.address,
                f" from {donor}" if donor else "",
                self.version,
                time.monotonic() - self.lagging_since,
            )
        self.lagging_since, self.retry_delay_s = None, 0.0
        metrics.TARGET_LAGGING.labels(self.model, self.address).set(0)

    def left_to_next_sync(self, why: str) -> None:
        """It answers, but the catch-up has nothing it would take (`why`): it is no longer
        lagging, so the next sync pushes to it with the others."""
        logger.warning("model %s: inference service %s: %s", self.model, self.address, why)
        self.lagging_since, self.retry_delay_s = None, 0.0
        metrics.TARGET_LAGGING.labels(self.model, self.address).set(0)

    def contact(self, connect_timeout_s: float) -> RemoteModel:
        """What it serves of the model, and which service instance answers;
        TargetUnreachableError when it does not answer within `connect_timeout_s`."""
        remote = self.client.get_model(self.model, connect_timeout_s)
        self.instance = remote.instance_id  # "" from a service that does not name it
        return remote

    def same_service_as(self, primary: Target) -> None:
        """It is `primary`'s service, reached by another address: from now on that service is
        fed through `primary` alone (two writers' leases from one trainer would fence each
        other)."""
        self.alias_of = primary.address
        self.lagging_since = None
        self.forget()
        logger.warning(
            "model %s: %s and %s reach the same inference service (instance %s): it is fed "
            "once, through %s. List each service once in the inference targets",
            self.model,
            primary.address,
            self.address,
            self.instance,
            primary.address,
        )

    def forget(self) -> None:
        """Stop counting it in the metrics (its address is no longer named, or it is an alias)."""
        for gauge in (metrics.TARGET_LAGGING, metrics.TARGET_VERSION):
            with contextlib.suppress(KeyError):  # never set
                gauge.remove(self.model, self.address)


class Targets:
    """Every target a publisher feeds: the model at each address its target names resolve to,
    with one client (channel) per address, made by `connect`."""

    def __init__(
        self,
        names: Sequence[str],
        connect: Callable[[Endpoint], SyncClient],
        resolve_wait_s: float | None = None,
    ) -> None:
        self.names = list(names)
        self._connect = connect
        # How long a sync waits for the names' DNS look-ups (see Lookups).
        self._lookups = Lookups(resolve_wait_s)
        self._lock = threading.Lock()
        self._clients: dict[str, SyncClient] = {}
        self._targets: dict[tuple[str, str], Target] = {}
        # (model, instance id) -> the target its service is fed through
        self._instances: dict[tuple[str, str], Target] = {}

    def resolved(self, model: str) -> list[Target]:
        """The model at every address the names resolve to now. A target whose address they
        no longer resolve to (a replica scaled away, or replaced at another address) is
        forgotten, metrics included: no longer fed nor caught up. While some name resolves to
        nothing at all (its DNS is down), only lagging ones are: the others keep what is known
        of them, to be fed deltas again when it resolves."""
        unresolved: list[str] = []
        endpoints = resolve(self.names, unresolved, self._lookups)
        dropped: list[SyncClient] = []
        with self._lock:
            found = [self._target(endpoint, model) for endpoint in endpoints]
            found = [t for t in found if t.alias_of is None]
            addresses = {endpoint.address for endpoint in endpoints}
            for (address, held), target in list(self._targets.items()):
                if (
                    held == model
                    and address not in addresses
                    and (target.lagging or not unresolved)
                ):
                    logger.warning(
                        "model %s: %s is no longer named by %s: it is no longer fed",
                        model,
                        address,
                        ", ".join(self.names),
                    )
                    target.forgotten = True
                    target.forget()
                    del self._targets[(address, model)]
                    if self._instances.get((model, target.instance or "")) is target:
                        del self._instances[(model, target.instance or "")]
                    if not any(a == address for a, _ in self._targets):  # no model left there
                        with contextlib.suppress(KeyError):  # never measured
                            metrics.LINK_RATE.remove(address)
                        if (client := self._clients.pop(address, None)) is not None:
                            dropped.append(client)
        for client in dropped:  # its connections, which keepalives would hold open for good
            client.close()
        return found

    def aliases(self, model: str) -> list[Target]:
        """The targets of `model` that reach a service another one feeds (`distinct`)."""
        with self._lock:
            return [t for t in self._targets.values() if t.model == model and t.alias_of]

    def primary_of(self, alias: Target) -> Target | None:
        """The target `alias`'s service is fed through (None: forgotten, or not an alias)."""
        with self._lock:
            return self._targets.get((alias.alias_of or "", alias.model))

    def recheck(self, alias: Target, primary_instance: str | None) -> None:
        """`alias` answered again (`Target.contact`), and its primary as `primary_instance`
        (None: its primary is gone): if they no longer reach one service (an address taken
        over by another replica), the alias becomes a target of its own, fed from the next
        sync on (unless another target feeds the service it reaches now: `distinct`)."""
        if alias.alias_of is None or (alias.instance and alias.instance == primary_instance):
            return
        with self._lock:
            was, alias.alias_of = alias.alias_of, None
        # Another service than any it answered as before: nothing it held is known.
        alias.epoch, alias.version, alias.hashes = None, 0, None
        metrics.TARGET_LAGGING.labels(alias.model, alias.address).set(0)
        logger.warning(
            "model %s: %s no longer reaches the inference service %s feeds (it answers as "
            "instance %s): it is fed on its own from now on",
            alias.model,
            alias.address,
            was,
            alias.instance or "unnamed",
        )
        self.distinct(alias)

    def known(self, model: str | None = None) -> list[Target]:
        """The targets known (of `model`; None: of every model), less the ones that reach a
        service another one feeds (`distinct`)."""
        with self._lock:
            return [
                t
                for t in self._targets.values()
                if (model is None or t.model == model) and t.alias_of is None
            ]

    def distinct(self, target: Target) -> bool:
        """Whether `target` is a service of its own: False (and from now on left out) when
        another target of its model answered with the same instance id first, i.e. one service
        is listed under two addresses; it is fed through that one. The first to answer is
        kept, so that one service is never written through two addresses at once."""
        if not target.instance or target.alias_of is not None:
            return target.alias_of is None
        key = (target.model, target.instance)
        with self._lock:
            first = self._instances.get(key)
            if first is None or first.instance != target.instance or first.alias_of is not None:
                first = self._instances[key] = target  # the one found before answers as another
        if first is target:
            return True
        target.same_service_as(first)
        return False

    def close(self) -> None:
        """Close every client (cancelling the calls in flight on them)."""
        with self._lock:
            clients = list(self._clients.values())
        for client in clients:
            client.close()

    def _target(self, endpoint: Endpoint, model: str) -> Target:
        target = self._targets.get((endpoint.address, model))
        if target is None:
            client = self._clients.get(endpoint.address)
            if client is None:
                client = self._clients[endpoint.address] = self._connect(endpoint)
            target = self._targets[(endpoint.address, model)] = Target(client, model)
            metrics.TARGET_LAGGING.labels(model, endpoint.address).set(0)
        return target
