"""Seeding: a replica pushes the version it serves to another replica (the hop), in full.

A trainer catching a new or lagging replica up asks a replica that already serves the newest
version to seed it, so the trainer's link does not carry one more whole copy. The seeding
replica opens a full push to the hop as forwarding does (forward.py: its sync plane's token,
TLS verifying the name given for the hop): the header carries the served version, the writer
recorded with it and the writer epoch the caller holds on the hop; the payload is the served
tensors in the served dtype, a safetensors file cut into chunks straight from the live weights;
the commit carries the served digest. The hop checks and commits it as any push, so a seeded
push is refused exactly where a direct one would be, and what became of it comes back as the
hop's result.

The live weights are not pinned while they stream: each chunk is copied while no push can start
overwriting them (`ServedModel.unchanged`, as the history writer does). A push that takes them
over meanwhile ends the seed (a newer version is served: the caller's expectation no longer
holds) before the hop commits anything.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

from inference_service.served_model import Generation, ServedModel
from inference_service.syncplane.forward import Forward, PeerAccess
from inference_service.syncplane.own import OwnAddress, address_problem
from inference_service.syncplane.parts import Commit, Data, Hop, HopResult, PushHeader
from shared.errors import (
    InferenceOnlyModelError,
    InvalidArgumentError,
    SeedVersionMismatchError,
)
from shared.weights.writer import DEFAULT_CHUNK_BYTES, Payload

logger = logging.getLogger(__name__)


class Seeder:
    """Seeds hops from the models served here, dialling them with `access`."""

    def __init__(self, access: PeerAccess, own: OwnAddress) -> None:
        self._access = access
        self._own = own

    def seed(self, model: ServedModel, version: int, hop: Hop) -> HopResult:
        """Push `model`'s served version, which must be `version`, to `hop`: what became of it
        there. Raises when the seed cannot start (the hop is this replica, the model takes no
        pushes, it serves another version) or a push replaced the version while it streamed."""
        if not hop.address:
            raise InvalidArgumentError("Seed needs the hop's address (HOST:PORT) to push to")
        if problem := address_problem(hop.address):
            raise InvalidArgumentError(f"Seed's hop: {problem}")
        if version <= 0:
            raise InvalidArgumentError(
                "Seed needs the version the replica is expected to serve (1 or more)"
            )
        if not model.accepts_pushes:
            raise InferenceOnlyModelError(
                f"model {model.name!r} is inference-only: it has no pushed versions to seed"
            )
        if self._own.names(hop.address):
            raise InvalidArgumentError(
                f"the hop {hop.address!r} is this replica's own sync plane: seed another replica"
            )
        generation, count = model.snapshot()
        if generation.version != version:
            raise SeedVersionMismatchError(
                f"model {model.name!r} serves version {generation.version}, not {version}: "
                "nothing was seeded"
            )
        payload = Payload.of_state(generation.committed)
        header = PushHeader(
            model.name,
            generation.version,
            0,
            generation.writer_id,
            payload.nbytes,
            hop.writer_epoch,
            (hop,),
        )
        logger.info(
            "model %s: seeding %s with version %d (%d bytes)",
            model.name,
            hop.address,
            version,
            payload.nbytes,
        )
        onward = Forward(header, self._access)
        try:
            for _ in onward.passing_on(_body(model, generation, count, payload)):
                pass
        except BaseException:
            onward.cancel()
            raise
        [result, *_] = onward.results()
        if result.committed:
            logger.info("model %s: seeded %s with version %d", model.name, hop.address, version)
        return result


def _body(
    model: ServedModel, generation: Generation, count: int, payload: Payload
) -> Iterator[Data | Commit]:
    """The payload of `generation`, each chunk copied while no push can start overwriting it,
    then the commit with its digest; SeedVersionMismatchError once a push has taken it over."""
    chunks = payload.pieces(DEFAULT_CHUNK_BYTES)
    left = payload.nbytes
    while left:
        with model.unchanged(generation, count) as unchanged:
            if not unchanged:
                raise SeedVersionMismatchError(
                    f"model {model.name!r}: a push started overwriting version "
                    f"{generation.version} while it was being seeded (a newer one is served); "
                    "the hop committed nothing of it"
                )
            chunk = b"".join(next(chunks))
        left -= len(chunk)
        yield chunk
    yield Commit(generation.digest)
