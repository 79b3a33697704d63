"""Push a model's weights to every inference service it feeds; return when every one that could
be reached has committed.

Per target (one model at one address: targets.Target) the publisher remembers the writer epoch
it holds there, the version it last committed there and that version's per-tensor hashes. The
next push to that target is a delta carrying only the tensors whose hash changed; a target that
answers that it lacks the base (it restarted, or someone else wrote) gets a full push instead.
Targets are addresses or DNS names; a name is resolved on every push to all of its addresses, so
new replicas behind one name are found and caught up with a full push.

A target that does not answer within the connect deadline, or whose push takes nothing for the
push stall timeout (push.py), holds nobody back: it is marked lagging, the sync completes once
every reachable target has committed, and the background catch-up (catchup.py, with capped
backoff) brings it to the newest version when it answers: seeded by a target that holds that
version (a Seed: the trainer's link carries nothing), else pushed from the host copy kept for it
(published.py). A sync fails when no target was reached, or one that answered refused it.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Collection, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from shared import protocol
from shared.grpc.auth import TlsFiles
from shared.weights.writer import DEFAULT_CHUNK_BYTES
from trainer_service import chain, metrics
from trainer_service.catchup import CatchUp
from trainer_service.delivery import Delivery, Version, hashed
from trainer_service.hostcopy import HostCopy, UsualSyncs
from trainer_service.names import warn_plaintext_token
from trainer_service.published import Published
from trainer_service.push import (
    DEFAULT_STALL_TIMEOUT_S,
    Pushed,
    PushFailedError,
    SyncClient,
    TargetUnreachableError,
)
from trainer_service.stopping import Stopping
from trainer_service.sync_errors import (
    SyncFailedError,
    SyncMisconfiguredError,
    SyncRefusedError,
    WriterFencedError,
    unreadable,
)
from trainer_service.targets import Snapshot, Target, Targets

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SyncReport:
    """One publish: the version, the payload bytes it cost on the wire, how many targets
    committed it and the addresses that lag behind it."""

    version: int
    payload_bytes: int
    targets: int
    lagging: tuple[str, ...] = ()


Tensors = Mapping[str, torch.Tensor]


class Publisher:
    """Streams versions of named models to a set of inference services."""

    def __init__(
        self,
        targets: Sequence[str],
        writer_id: str,
        *,
        timeout_s: float = 600.0,
        connect_timeout_s: float = 3.0,
        push_stall_timeout_s: float = DEFAULT_STALL_TIMEOUT_S,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        token: str | None = None,
        tls: TlsFiles | None = None,
        retries: int = 2,
        retry_delay_s: float = 0.2,
        fanout: str = "chain",
        push_encoding: str = "auto",
        catch_up_from_peers: bool = True,
        stopping: Stopping | None = None,
    ) -> None:
        self._delivery = Delivery(
            writer_id, connect_timeout_s, retries, retry_delay_s, push_encoding
        )
        self._targets = Targets(
            targets,
            lambda endpoint: SyncClient(
                endpoint.address,
                timeout_s,
                chunk_bytes,
                token,
                tls,
                endpoint.server_name,
                push_stall_timeout_s,
                stopping,
            ),
            resolve_wait_s=connect_timeout_s,
        )
        self.writer_id = writer_id
        self._chained = fanout == "chain"
        self._from_peers = catch_up_from_peers
        self._published = Published(self._targets)
        self._usual = UsualSyncs()
        self._pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="push")
        warn_plaintext_token(targets, token, tls)
        self._catch_up = CatchUp(self._published, self._delivery, catch_up_from_peers)

    def close(self) -> None:
        self._catch_up.stop()
        self._targets.close()  # cancels catch-ups in flight
        self._catch_up.join()
        self._pool.shutdown(wait=True)
        for target in self._published.lagging():
            logger.warning(
                "model %s: exiting with %s behind, at version %d of %d",
                target.model,
                target.address,
                target.version,
                self._published.versions.get(target.model, 0),
            )

    def version(self, model_name: str) -> int:
        """The last version of `model_name` this publisher pushed (0: none yet)."""
        return self._published.versions.get(model_name, 0)

    def publish(
        self,
        model_name: str,
        state: Tensors,
        *,
        full: bool = False,
        owned: Collection[str] = (),
    ) -> SyncReport:
        """Push `state` as the next version of `model_name` to every target.

        Each target gets a delta on the last version it committed from this publisher when it
        can take one; `full` sends every tensor regardless (to re-seed targets whose weights
        are in doubt). `owned` names tensors the caller hands over and never writes again (made
        for this push, as a conversion to the served dtype is): a later delta is encoded
        against them as they are, with no copy kept of them (bases.py)."""
        if self._published.fenced is not None:
            raise WriterFencedError(self._published.fenced)
        try:
            with (
                self._published.syncing(model_name),
                HostCopy(self._pool, state, owned) as copy,  # what a target left behind needs
            ):
                return self._publish(model_name, state, full, frozenset(owned), copy)
        finally:
            self._catch_up.wake()  # targets may lag now, or have a newer version to catch up to

    def _publish(
        self, model_name: str, state: Tensors, full: bool, owned: frozenset[str], copy: HostCopy
    ) -> SyncReport:
        started = time.perf_counter()
        tensors = {name: t.detach() if t.requires_grad else t for name, t in state.items()}
        targets = self._targets.resolved(model_name)
        if not targets:
            raise SyncFailedError(f"no inference service found at {', '.join(self._targets.names)}")
        for alias in self._targets.aliases(model_name):  # off the sync's path
            self._pool.submit(self._recheck, alias)
        with self._published.lock:  # lagging targets are the catch-up's, unless all lag
            inline = [t for t in targets if not t.lagging] or targets
            skipped = [t for t in targets if t not in inline]
        if full:
            for target in inline:
                target.hashes = None
        version, unreachable = self._next_version(model_name, inline)
        inline = [t for t in inline if t not in unreachable and self._targets.distinct(t)]
        pushing = time.perf_counter()
        if skipped or unreachable:
            copy.start()  # the sync leaves a target behind: its copy is made while pushing
        elif len(inline) > 1 and (late_s := self._usual.late_after(model_name)) is not None:
            copy.start_after(late_s)  # a late push may leave one behind (one cut mid-push)
        # Hash up front only when some target can take a delta (it needs the changed set),
        # and only the tensors not already known to have changed; the rest, and every tensor
        # of a full push, are hashed while they stream.
        hashes: dict[str, bytes] | None = None
        changed: frozenset[str] = frozenset()
        if any(t.delta_base(tensors) is not None for t in inline):
            changed = self._delivery.known_changed(model_name, inline, tensors)
            hashes = hashed(tensors, changed)
            if changed:
                logger.debug(
                    "model %s v%d: %d tensor(s) hashed up front, %d known changed by their "
                    "probes (hashed while they stream)",
                    model_name,
                    version,
                    len(hashes),
                    len(changed),
                )
        delivered = Version(version, tensors, hashes, owned, changed)
        sent, committed, errors = 0, [], []
        missed = [str(e) for e in unreachable.values()]
        for target, outcome in self._deliver(inline, delivered):
            if isinstance(outcome, chain.Refused):
                errors.append(outcome.error)
            elif isinstance(outcome, PushFailedError):
                missed.append(str(outcome))
            elif isinstance(outcome, Pushed):
                sent += outcome.nbytes
                committed.append(target)
        if any(isinstance(e, PushFailedError) and e.reason == protocol.FENCED for e in errors):
            raise WriterFencedError(self._published.fence(model_name, "; ".join(map(str, errors))))
        if (hashes is None or changed) and committed:  # the hashes its push streamed
            hashes = committed[0].hashes
        elif changed:
            hashes = None  # not all known: a catch-up hashes the version anew
        # The version is spent even if some target missed it: the ones that committed it must
        # never be offered the same number again.
        if len(committed) == len(targets):
            self._usual.record(model_name, time.perf_counter() - pushing)
        lagging = self._spend(model_name, version, hashes, targets, skipped, copy)
        if errors or not committed:
            metrics.SYNC_FAILURES.labels(model_name).inc()
            if errors:
                raise SyncRefusedError(
                    f"model {model_name!r} version {version} was not committed everywhere: "
                    + "; ".join(map(str, errors))
                )
            raise SyncFailedError(
                f"model {model_name!r} version {version}: no inference service could be "
                "reached: " + "; ".join(missed)
            )
        metrics.MODEL_VERSION.labels(model_name).set(version)
        metrics.SYNC_SECONDS.labels(model_name).observe(time.perf_counter() - started)
        logger.info(
            "model %s: version %d committed on %d inference service(s) in %.3fs%s",
            model_name,
            version,
            len(committed),
            time.perf_counter() - started,
            f"; lagging: {', '.join(lagging)}" if lagging else "",
        )
        return SyncReport(version, sent, len(committed), tuple(lagging))

    def _deliver(
        self, targets: Sequence[Target], version: Version
    ) -> list[tuple[Target, chain.Outcome]]:
        """Push `version` to `targets`: the ones that share a delta base in chains (see
        chain.py), the others alone; the ones a failed hop kept it from, again at once (one the
        replica before it could not reach, once it answers the trainer itself). Where
        some target takes a delta (the version's hashes are known up front), the ones without
        a base are seeded afterwards by the targets that committed it."""
        done: list[tuple[Target, chain.Outcome]] = []
        chained, direct, whole = list(targets), list[Target](), list[Target]()
        if self._from_peers and version.hashes is not None:
            whole = [t for t in targets if t.delta_base(version.tensors) is None]
            chained = [t for t in targets if t not in whole]
        asked: list[tuple[Target, chain.Unreached]] = []
        while chained or direct or asked:
            chains, alone = chain.plan(chained, version.tensors, self._chained)
            futures = [
                self._pool.submit(chain.deliver_chain, self._delivery, c, version) for c in chains
            ]
            futures += [
                self._pool.submit(chain.deliver_one, self._delivery, t, version)
                for t in [*alone, *direct]
            ]
            within_s = self._delivery.connect_timeout_s
            futures += [self._pool.submit(chain.ask, t, why, within_s) for t, why in asked]
            chained, direct, asked = list[Target](), list[Target](), []
            for future in futures:
                for target, outcome in future.result():
                    if outcome is chain.Again.CHAINED:
                        chained.append(target)
                    elif outcome is chain.Again.DIRECT:
                        direct.append(target)
                    elif outcome is chain.Again.WHOLE:
                        (whole if self._from_peers else direct).append(target)
                    elif isinstance(outcome, chain.Unreached):
                        asked.append((target, outcome))
                    else:
                        done.append((target, outcome))
        return done + self._seed(whole, [t for t, o in done if isinstance(o, Pushed)], version)

    def _seed(
        self, targets: Sequence[Target], donors: Sequence[Target], version: Version
    ) -> list[tuple[Target, chain.Outcome]]:
        """`targets` seeded with `version` by `donors` (round-robin), or pushed directly where
        there are none."""
        if donors and version.changed:  # a seed names every hash: the donors hold them all
            version = dataclasses.replace(
                version, hashes=dict(donors[0].hashes or {}), changed=frozenset()
            )
        if donors:
            futures = [
                self._pool.submit(
                    chain.seed_one, self._delivery, t, donors[i % len(donors)], version
                )
                for i, t in enumerate(targets)
            ]
        else:
            futures = [
                self._pool.submit(chain.deliver_one, self._delivery, t, version) for t in targets
            ]
        return [outcome for future in futures for outcome in future.result()]

    def _spend(
        self,
        model_name: str,
        version: int,
        hashes: dict[str, bytes] | None,
        targets: Sequence[Target],
        skipped: Sequence[Target],
        copy: HostCopy,
    ) -> list[str]:
        """Record `version` as the newest; while a target lags, keep a host copy of it for the
        catch-up. Returns the addresses that lag."""
        published = self._published
        copied = None
        if any(t.lagging for t in targets):  # copied outside the lock
            copied = copy.result()
        with published.lock:
            published.versions[model_name] = version
            for target in skipped:  # a catch-up may have finished with an older version meanwhile
                if not target.lagging and target.version < version:
                    target.fall_behind(f"it missed version {version} while being caught up")
            lagging = [t.address for t in targets if t.lagging]
            if lagging:
                if copied is None:  # one fell behind since the look above
                    copied = copy.result()
                published.snapshots[model_name] = Snapshot(version, copied, hashes)
            else:
                published.snapshots.pop(model_name, None)
        return lagging

    def _recheck(self, alias: Target) -> None:
        """Ask `alias` and its primary which service each reaches now: an alias that no longer
        reaches its primary's (its address taken over by another replica, the primary's by
        another, or the primary gone) is fed on its own from the next sync on. Skipped while
        another look at it runs; while either does not answer, it stays an alias."""
        if not alias.lock.acquire(blocking=False):
            return
        try:
            primary = self._targets.primary_of(alias)
            timeout_s = self._delivery.connect_timeout_s
            reaches = None if primary is None else primary.client.get_model(alias.model, timeout_s)
            alias.contact(timeout_s)
        except PushFailedError:
            return
        finally:
            alias.lock.release()
        self._targets.recheck(alias, None if reaches is None else reaches.instance_id)

    def _next_version(
        self, model_name: str, targets: Sequence[Target]
    ) -> tuple[int, dict[Target, TargetUnreachableError]]:
        """The version to push next, and the targets found unreachable on first contact. The
        targets not contacted yet are asked what they serve, which says which service each is
        (targets.Targets.distinct); the first push of a model asks every target. The numbering
        continues above every version a target answers it serves (a replica that joins, or
        returns, serving a version a trainer before this one pushed) and above the ones the
        catch-up found (published.py `numbered_above`): versions only increase everywhere."""
        first = model_name not in self._published.versions
        probes = [
            (t, self._pool.submit(self._delivery.probe, t))
            for t in targets
            if first or t.instance is None
        ]
        served, unreachable = [], {}
        for target, probe in probes:
            try:
                served.append(probe.result())
            except TargetUnreachableError as error:  # or it serves too high a version
                target.fall_behind(error)
                unreachable[target] = error
            except PushFailedError as error:
                raise unreadable(error.code)(
                    f"model {model_name!r}: cannot read the served version: {error}"
                ) from None
        if not first:
            return self._published.numbered_above(
                model_name, max(served, default=0)
            ) + 1, unreachable
        if not served:
            metrics.SYNC_FAILURES.labels(model_name).inc()
            if all(e.reason == protocol.OUT_OF_RANGE for e in unreachable.values()):
                raise SyncMisconfiguredError(  # each answered: waiting cannot help
                    f"model {model_name!r}: every inference service is left out: "
                    + "; ".join(map(str, unreachable.values()))
                )
            raise SyncFailedError(
                f"model {model_name!r}: no inference service could be reached: "
                + "; ".join(map(str, unreachable.values()))
            )
        return max(served) + 1, unreachable
