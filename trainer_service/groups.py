"""What trainer groups may not share: a trainer, a state directory, a model, or a buffer.

Replicas of a trainer split the app's trainer groups between them (`--trainer-groups`), each
writing the models its group's trainers use and holding the buffers they read. A model trained
in two groups would have two writers: each replica's lease would fence the other's, and the
one fenced stops. A buffer read in two groups would be held by both replicas while an agent
(or an inference service recording into it) streams to one of them only: the other group's
trainers would wait for samples that never come. Both are known from the app, so both are
refused at start.

Each group keeps its state in a directory named after its trainers, and a replica running a
group holds a lock on each of its trainers besides (`member_locks`): replicas started with
different groups on one volume (a rolling change of the layout) never run one trainer twice;
the one whose group overlaps a running one stands by.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from shared.app import App
from shared.errors import ConfigurationError
from shared.model import TrainingModelsDict
from shared.trainer.base import TrainersDict
from trainer_service.experience.buffers import Buffers

# Where each trainer's lock lies, under the state directory (a group's own directory may not be
# named so).
MEMBERS = ".trainers"
MAX_NAME_BYTES = 255  # a directory's name, on every common file system


def group_dirs(app: App, groups: Sequence[Sequence[str]], state_dir: Path) -> list[Path]:
    """Each group's state directory under `state_dir`: its trainers' names joined by '+'.

    Raises:
        ConfigurationError: A group names a trainer the app does not define, a trainer is
            named twice (in one group or two), two groups would share a directory (a trainer
            named 'a+b' beside the group 'a,b'), or a directory's name would be too long.
    """
    unknown = sorted({n for group in groups for n in group} - set(app.trainers))
    if unknown:
        raise ConfigurationError(
            f"--trainer-groups names trainer(s) {', '.join(unknown)} that the app does not "
            f"define (it defines: {', '.join(sorted(app.trainers)) or 'none'})"
        )
    seen: dict[str, int] = {}
    dirs: dict[str, str] = {}
    for index, group in enumerate(groups):
        listed = ",".join(group)
        for name in group:
            if name in seen:
                first = ",".join(groups[seen[name]])
                where = (
                    f"twice in the group {listed}"
                    if seen[name] == index
                    else f"in the groups {first} and {listed}"
                )
                raise ConfigurationError(
                    f"--trainer-groups names trainer {name!r} {where}: a trainer belongs to "
                    "one group"
                )
            seen[name] = index
        directory = "+".join(group)
        if directory in dirs or directory == MEMBERS:
            clash = f"the groups {dirs[directory]} and {listed}" if directory in dirs else listed
            raise ConfigurationError(
                f"--trainer-groups: {clash} would keep state in one directory, {directory!r} "
                "(a group's directory joins its trainers' names with '+'): rename the trainer"
            )
        if len(directory.encode()) > MAX_NAME_BYTES:
            raise ConfigurationError(
                f"--trainer-groups: the group {listed} needs a state directory named by its "
                f"trainers' names joined, {len(directory.encode())} bytes, past the "
                f"{MAX_NAME_BYTES} a directory's name may have: shorten the trainers' names"
            )
        dirs[directory] = listed
    return [state_dir / d for d in dirs]


def member_locks(groups: Sequence[Sequence[str]], state_dir: Path) -> list[list[Path]]:
    """Each group's trainers' lock files: held by whichever replica runs them, in any group."""
    return [[state_dir / MEMBERS / f"{name}.lock" for name in group] for group in groups]


def check_groups(app: App, groups: Sequence[Sequence[str]], models: TrainingModelsDict) -> None:
    """Refuse trainer groups that share a model or a buffer. Every group's trainers are built
    and attached to `models` (the app's, as this process built them) to learn what they use
    (`group_dirs` has checked their names).

    Raises:
        ConfigurationError: Trainers of two groups use one model, or read one buffer.
    """
    buffers = Buffers.of(app) if app.buffers else None
    users: dict[tuple[str, str], list[str]] = {}
    for group in groups:
        trainers = TrainersDict({n: app.trainers[n]() for n in group})
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
