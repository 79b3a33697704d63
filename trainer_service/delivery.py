"""One version of one model delivered to one inference service, whatever it takes.

A cheap call first (it waits up to the connect deadline for a restarting target, and says
whether it still serves the version we last committed there); the writer lease on first
contact; then a delta on that version when the target can take one, else a full push. A target
that lacks the delta's base gets a full push; one that no longer knows our lease (it lost its
state) is asked for the lease again, once. A push cut off once it had started is retried with
capped exponential backoff and jitter.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import random
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import grpc
import torch

from shared import protocol
from shared.weights.digest import state_table, tensor_hashes
from shared.weights.ties import ties
from shared.weights.writer import Payload
from trainer_service import metrics
from trainer_service.bases import Bases
from trainer_service.encoding_choice import AUTO, EncodingChooser
from trainer_service.published import NUMBERING_CEILING, too_high
from trainer_service.push import (
    UNREACHABLE,
    Hop,
    HopResult,
    PushAnswer,
    Pushed,
    PushFailedError,
    PushPlan,
    RemoteModel,
    SyncClient,
    TargetUnreachableError,
)
from trainer_service.targets import Target

logger = logging.getLogger(__name__)

Tensors = Mapping[str, torch.Tensor]


def hashed(tensors: Tensors, changed: frozenset[str] = frozenset()) -> dict[str, bytes]:
    """Each tensor's hash, but those of the names in `changed` (whole tie groups: see
    `Delivery.known_changed`), which are hashed while they stream."""
    if not changed:
        return tensor_hashes(tensors)
    return tensor_hashes({name: t for name, t in tensors.items() if name not in changed})


@dataclass(frozen=True)
class Version:
    """One version of a model's state, to deliver: `hashes`, each tensor's where known up front
    (None: hashed while streaming, in a full push), every one but those named in `changed`,
    which are known to differ from the targets' delta base (their probe does: bases.py) and
    are hashed while they stream; `owned`: tensors nobody writes again, kept as they are for
    later deltas (no copy)."""

    number: int
    tensors: Tensors
    hashes: dict[str, bytes] | None = None
    owned: frozenset[str] = frozenset()
    changed: frozenset[str] = frozenset()

    @functools.cached_property
    def digest(self) -> bytes | None:
        """The digest of the whole state, where every tensor's hash is known up front."""
        if self.hashes is None or self.changed:
            return None
        return state_table(self.tensors).digest(self.hashes)

    @functools.cached_property
    def tied(self) -> dict[str, str]:
        """The names that hold a tensor an earlier name holds (shared/weights/ties.py): they
        travel as that name."""
        return ties(self.tensors)

    @property
    def untied(self) -> Tensors:
        """Each tensor under its first name only."""
        tied = self.tied
        return {n: t for n, t in self.tensors.items() if n not in tied} if tied else self.tensors


class Delivery:
    def __init__(
        self,
        writer_id: str,
        connect_timeout_s: float,
        retries: int,
        retry_delay_s: float,
        encoding: str = AUTO,
    ) -> None:
        self.writer_id = writer_id
        self.connect_timeout_s = connect_timeout_s
        self._retries = retries
        self._retry_delay_s = retry_delay_s
        # How changed tensors travel (encoding_choice.py), and the versions they are encoded
        # against (bases.py).
        self._chooser = EncodingChooser(encoding)
        self._bases = Bases()

    def known_changed(
        self, model: str, targets: Sequence[Target], tensors: Tensors
    ) -> frozenset[str]:
        """The tensors known to differ from the delta base of every one of `targets` that has
        one, without hashing them (bases.py `differing`: a dense change is seen on its probe),
        with the names tied to them: they travel whole, and are hashed while they stream, so
        that a push whose tensors all changed densely hashes nothing up front."""
        bases = {t.version for t in targets if t.delta_base(tensors) is not None}
        if not bases:
            return frozenset()
        changed = set.intersection(*(self._bases.differing(model, v, tensors) for v in bases))
        if not changed:
            return frozenset()
        tied = ties(tensors)
        return frozenset(changed | {name for name, first in tied.items() if first in changed})

    def probe(self, target: Target) -> int:
        """The version `target` serves; TargetUnreachableError if it does not answer in time,
        or (reason out-of-range) if it serves one the numbering leaves out (published.py)."""
        with target.lock:
            version = target.contact(self.connect_timeout_s).version
        if version >= NUMBERING_CEILING:
            why = too_high(target.address, version)
            raise TargetUnreachableError(
                target.address, grpc.StatusCode.OUT_OF_RANGE, why, protocol.OUT_OF_RANGE
            )
        return version

    def deliver(
        self, target: Target, version: Version, route: tuple[Hop, ...] = ()
    ) -> Pushed | PushFailedError:
        """Push `version` to `target` (which passes it on down `route`): what it cost and what
        became of it down the route, or why it could not be reached (it lags now). A target
        that answered with a refusal raises PushFailedError."""
        with target.lock:
            delay = self._retry_delay_s
            for attempt in range(self._retries + 1):
                try:
                    sent = self.push(target, version, route)
                except TargetUnreachableError as error:
                    target.fall_behind(error)
                    return error
                except PushFailedError as error:
                    if error.code not in UNREACHABLE:
                        raise
                    if attempt == self._retries:
                        target.fall_behind(error)
                        return error
                    logger.info(
                        "%s (attempt %d); retrying in about %.1fs", error, attempt + 1, delay
                    )
                    time.sleep(delay * random.uniform(0.5, 1.5))
                    delay = min(delay * 2, 5.0)
                else:
                    target.caught_up()
                    return sent
        raise AssertionError("unreachable")

    def seed(
        self, target: Target, donor: Target, version: Version, remote: RemoteModel | None = None
    ) -> bool:
        """Have `donor`, which acknowledged `version`, push it to `target` (a Seed), once this
        trainer holds the writer lease there: whether `target` committed it. The caller holds
        `target.lock`; a donor that refuses or fails is logged, and the caller pushes directly.
        TargetUnreachableError when `target` does not answer. `remote`: what `target` answered
        the caller under the same hold of its lock (None: it is asked)."""
        assert version.hashes is not None and not version.changed
        if remote is None:
            remote = target.contact(self.connect_timeout_s)
        if remote.version >= version.number:  # a direct push sorts out what it holds
            return False
        if target.epoch is None:  # first contact: become the writer (fences earlier ones)
            target.epoch = target.client.acquire_writer(target.model, self.writer_id)
        result = self._seeded(target, donor, version.number)
        if result.reason == protocol.UNKNOWN_EPOCH:  # it restarted without its state
            target.epoch = None
            target.epoch = target.client.acquire_writer(target.model, self.writer_id)
            result = self._seeded(target, donor, version.number)
        if result.version != version.number:
            logger.info(
                "model %s: %s could not catch %s up to version %d (%s: %s); pushing it directly",
                target.model,
                donor.address,
                target.address,
                version.number,
                result.code.name,
                result.message,
            )
            return False
        target.acknowledged(version.number, version.hashes)
        return True

    @staticmethod
    def _seeded(target: Target, donor: Target, version: int) -> HopResult:
        """What became of `donor`'s seed of `version` on `target` (its own refusal, if any, as
        the result)."""
        assert target.epoch is not None
        hop = Hop(target.address, target.client.server_name, target.epoch)
        try:
            return donor.client.seed(target.model, version, hop)
        except PushFailedError as error:
            return HopResult(target.address, 0, error.code, error.reason or "", str(error))

    def push(
        self,
        target: Target,
        version: Version,
        route: tuple[Hop, ...] = (),
        remote: RemoteModel | None = None,
    ) -> Pushed:
        """One try, with the fallbacks the target's answers call for; the caller holds
        `target.lock`. `remote`: as for `seed`."""
        if remote is None:
            remote = target.contact(self.connect_timeout_s)
        if (  # committed already: passed on to it by a replica whose own push then failed
            remote.version == version.number
            and remote.writer_id == self.writer_id
            and version.hashes is not None
        ):
            if version.changed:  # (rare) its digest needs every hash
                version = dataclasses.replace(
                    version, hashes=hashed(version.tensors), changed=frozenset()
                )
            if version.hashes is not None and remote.digest == version.digest:
                target.acknowledged(version.number, version.hashes)
                return Pushed(0)
        if target.epoch is None:  # first contact: become the writer (fences earlier ones)
            target.epoch = target.client.acquire_writer(target.model, self.writer_id)
        base = target.delta_base(version.tensors) if remote.version == target.version else None
        if base is not None and version.hashes is None:
            changed = self.known_changed(target.model, [target], version.tensors)
            version = dataclasses.replace(
                version, hashes=hashed(version.tensors, changed), changed=changed
            )
        copying = self._keep_while_pushing(target, version)
        try:
            plan, hops = self._push_with_fallbacks(target, version, base, route)
        finally:
            if copying is not None:  # the trainer may change the tensors once this returns
                copying.join()
        acked = plan.streamed_hashes if plan.digest is None else version.hashes  # a digest comes
        assert acked is not None  # with the hashes it was made of
        target.acknowledged(version.number, acked)
        if copying is None and self._chooser.wants_bases(target.address):  # a later delta
            dense = self._chooser.dense(target.model)  # encodes against it
            self._bases.keep(
                target.model, version.number, version.untied, acked, dense, version.owned
            )
        return Pushed(plan.payload.nbytes, hops)

    def _keep_while_pushing(self, target: Target, version: Version) -> threading.Thread | None:
        """Where the version's hashes are known up front (a delta), the copy a later delta
        encodes against is made while the push streams rather than after it; push() joins it
        before returning (tensors whose last change was too dense for any encoding are kept as
        probes: bases.py). None where no copy is wanted or the hashes come from the push."""
        if version.hashes is None or not self._chooser.wants_bases(target.address):
            return None
        dense = self._chooser.dense(target.model)
        thread = threading.Thread(
            target=self._bases.keep,
            args=(
                target.model,
                version.number,
                version.untied,
                version.hashes,
                dense,
                version.owned,
            ),
            name="base-copy",
            daemon=True,
        )
        thread.start()
        return thread

    def _push_with_fallbacks(
        self,
        target: Target,
        version: Version,
        base: dict[str, bytes] | None,
        route: tuple[Hop, ...],
    ) -> tuple[PushPlan, tuple[HopResult, ...]]:
        """Push until committed, acquiring the lease again or falling back to a full push as
        the target's answers call for: the plan that committed and its hops' results."""
        acquired_again = False
        while True:
            plan = dataclasses.replace(self._plan(target, version, base), route=route)
            try:
                began = time.perf_counter()
                answer = self._push_counted(target.client, plan)
                seconds = time.perf_counter() - began
                self._chooser.pushed(plan, target.address, seconds, answer.finish_s)
                return plan, answer.hops
            except PushFailedError as error:
                if error.reason == protocol.UNKNOWN_EPOCH and not acquired_again:
                    logger.info(
                        "%s no longer knows our writer lease of %s (epoch %d; it lost its "
                        "state); acquiring it again",
                        target.address,
                        target.model,
                        target.epoch,
                    )
                    target.epoch = None
                    target.epoch = target.client.acquire_writer(target.model, self.writer_id)
                    acquired_again = True
                elif error.reason == protocol.BASE_VERSION_MISMATCH and plan.base_version != 0:
                    logger.info(
                        "%s lacks version %d of %s; pushing in full",
                        target.address,
                        plan.base_version,
                        target.model,
                    )
                    base = None
                else:
                    raise

    @staticmethod
    def _push_counted(client: SyncClient, plan: PushPlan) -> PushAnswer:
        kind = "full" if plan.base_version == 0 else "delta"
        try:
            answer = client.push(plan)
        except PushFailedError as error:
            metrics.PUSHES.labels(plan.model_name, kind, error.code.name.lower()).inc()
            raise
        metrics.PUSHES.labels(plan.model_name, kind, "committed").inc()
        metrics.PUSH_BYTES.labels(plan.model_name, kind).inc(plan.payload.nbytes)
        return answer

    def _plan(self, target: Target, version: Version, base: dict[str, bytes] | None) -> PushPlan:
        assert target.epoch is not None
        tensors, hashes = version.tensors, version.hashes
        if base is None or hashes is None:
            changed, base_version = list(tensors), 0
        else:
            known = version.changed
            changed = [n for n in tensors if n in known or base[n] != hashes[n]]
            base_version = target.version
        # A tied name travels as the name it is tied to, which changed with it.
        changing = set(changed)
        tied = {n: s for n in changed if (s := version.tied.get(n)) is not None and s in changing}
        carried = [(name, tensors[name]) for name in changed if name not in tied]
        kept = self._bases.get(target.model, base_version) if base_version else None
        if kept is None or not self._chooser.wants_bases(target.address):
            payload = Payload.of(carried, tied=tied)
        else:
            # Targets taking the same version on the same base share each tensor's encoding.
            push = (target.model, version.number, base_version)
            probes = self._bases.probes(target.model, base_version)
            encoded = self._chooser.encode(target.address, carried, kept, push, probes)
            payload = Payload.of(carried, encoded=encoded.tensors, tied=tied)
            logger.debug(
                "model %s v%d -> %s (delta on %d): %s; encoded in %.3fs",
                target.model,
                version.number,
                target.address,
                base_version,
                encoded.summary(),
                encoded.seconds,
            )
        digest = version.digest
        return PushPlan(
            target.model,
            version.number,
            base_version,
            self.writer_id,
            payload,
            target.epoch,
            digest,
            # what is not hashed up front is hashed as it streams (all of a full push)
            streamed_hashes=dict(hashes) if digest is None and hashes is not None else {},
            table=state_table(tensors) if digest is None else None,
        )
