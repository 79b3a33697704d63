"""What trainer groups may not share: a model, or a buffer.

Replicas of a trainer split the app's trainer groups between them (`--trainer-groups`), each
writing the models its group's trainers use and holding the buffers they read. A model trained
in two groups would have two writers: each replica's lease would fence the other's, and the
one fenced stops. A buffer read in two groups would be held by both replicas while an agent
(or an inference service recording into it) streams to one of them only: the other group's
trainers would wait for samples that never come. Both are known from the app, so both are
refused at start.
"""

from __future__ import annotations

from collections.abc import Sequence

from shared.app import App
from shared.errors import ConfigurationError
from shared.model import TrainingModelsDict
from shared.trainer.base import TrainersDict
from trainer_service.experience.buffers import Buffers


def check_groups(app: App, groups: Sequence[Sequence[str]], models: TrainingModelsDict) -> None:
    """Refuse trainer groups that name a trainer the app does not define, or that share a
    model or a buffer. Every group's trainers are built and attached to `models` (the app's,
    as this process built them) to learn what they use.

    Raises:
        ConfigurationError: A group names an unknown trainer, or trainers of two groups use
            one model, or read one buffer.
    """
    unknown = sorted({n for group in groups for n in group} - set(app.trainers))
    if unknown:
        raise ConfigurationError(
            f"--trainer-groups names trainer(s) {', '.join(unknown)} that the app does not "
            f"define (it defines: {', '.join(sorted(app.trainers)) or 'none'})"
        )
    buffers = Buffers.of(app) if app.buffers else None
    users: dict[tuple[str, str], list[str]] = {}
    for group in groups:
        trainers = TrainersDict({n: app.trainers[n]() for n in group if n in app.trainers})
        trainers.attach_training_models(models)
        named = "+".join(group)
        used = {n for t in trainers.values() for n in t.retrieved_model_names}
        for model in sorted(used):
            users.setdefault(("model", model), []).append(named)
        for buffer in sorted(buffers.read_by(trainers) if buffers is not None else ()):
            users.setdefault(("buffer", buffer), []).append(named)
    shared = {what: names for what, names in users.items() if len(names) > 1}
    if shared:
        raise ConfigurationError(
            "trainer groups must not share a model or a buffer: "
            + "; ".join(
                f"{kind} {name!r} is used by the groups {' and '.join(names)}"
                for (kind, name), names in sorted(shared.items())
            )
            + ". A model trained in two groups would have two writers, each fencing the "
            "other; a buffer read in two is streamed to one of them only: put the trainers "
            "that share one in one group"
        )
