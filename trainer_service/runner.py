"""The training loop: build models and trainers, catch the inference services up, run trainers.

PAMIQ's semantics across machines: one `Trainer.run()` at a time, round robin; each run ends
with `sync_models()`, which for a model whose inference copy is remote streams the weights to
every inference service and returns once every reachable one committed (one that is down lags
and is caught up in the background), then `teardown()`. A sync that fails (no inference service
reachable, or one refused the version) is logged and the loop goes on; the next sync catches up.
Data-parallel ranks learn from rank 0, the one that pushes, how each sync went, and act on it
together: a fenced writer stops every rank.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Sequence
from enum import IntEnum
from pathlib import Path
from typing import Any

import torch
from typing_extensions import override

from shared.app import App
from shared.errors import ConfigurationError, StateWriteError
from shared.model.container import TrainingModelsDict
from shared.model.interface import TrainingModel
from shared.torch.build import build_torch_model, overriding_device
from shared.torch.model import TorchTrainingModel
from shared.trainer.base import Trainer, TrainersDict
from trainer_service import metrics
from trainer_service.checkpoint import Checkpoints
from trainer_service.distributed import Group
from trainer_service.experience.buffers import Buffers
from trainer_service.publisher import Publisher
from trainer_service.remote import PublishedByRankZero, PublishedInferenceModel, Syncs
from trainer_service.sync_errors import (
    SyncFailedError,
    SyncMisconfiguredError,
    SyncRefusedError,
    WriterFencedError,
)

logger = logging.getLogger(__name__)

# How long the loop waits when no trainer was trainable (each waits for its data).
IDLE_WAIT_S = 0.02


class Outcome(IntEnum):
    """How a sync went, as rank 0 tells the other data-parallel ranks."""

    SYNCED = 0
    FAILED = 1
    FENCED = 2
    REFUSED = 3  # a service answered and refused (SyncRefusedError)
    MISCONFIGURED = 4  # a service answered that this trainer cannot push to it at all


class _TrainerModels(TrainingModelsDict):
    """The trainer's models. Inference-only ones are loaded by the inference service alone;
    their names are kept so that looking one up says why, as PAMIQ's dict does."""

    def __init__(self) -> None:
        self.inference_only: set[str] = set()
        super().__init__()

    @override
    def __getitem__(self, key: str) -> TrainingModel[Any]:
        if key in self.inference_only:
            raise KeyError(f"model '{key}' is inference thread only.")
        return super().__getitem__(key)


class TrainingLoop:
    def __init__(
        self,
        app: App,
        publisher: Publisher,
        device: torch.device,
        trainer_names: Sequence[str] | None = None,
        state_dir: Path | None = None,
        group: Group | None = None,
    ) -> None:
        self.group = group
        writes = group is None or group.is_writer
        self.checkpoints = Checkpoints(state_dir) if state_dir is not None else None
        self.syncs = Syncs(started=False)  # until start(): nothing is pushed before resume()
        self._silent: set[str] = set()  # models whose sync was seen to send nothing
        self.models = _TrainerModels()
        for spec in app.models.values():
            model = build_torch_model(spec.name, spec.build)
            if model.inference_thread_only:
                logger.info("model %s is inference-only; the inference service loads it", spec.name)
                self.models.inference_only.add(spec.name)
                continue
            model.model.to(overriding_device(spec.name, model, device))
            if model.has_inference_model:  # before the dict would build a local copy
                model.attach_inference_model(
                    PublishedInferenceModel(spec.name, publisher, spec.served_dtype, self.syncs)
                    if writes
                    else PublishedByRankZero(spec.name)
                )
            self.models[spec.name] = model
        names = list(trainer_names) if trainer_names else list(app.trainers)
        unknown = sorted(set(names) - set(app.trainers))
        if unknown:
            raise ConfigurationError(
                f"unknown trainer(s) {', '.join(unknown)}; the app defines "
                f"{', '.join(sorted(app.trainers)) or 'none'}"
            )
        self.trainers = TrainersDict({name: app.trainers[name]() for name in names})
        for name in names:  # each trainer's series exists from the start, 0 until it runs
            metrics.RUNS.labels(name)
        self.trainers.attach_training_models(self.models)
        # A trainer group holds the buffers its trainers read (experience/buffers.py).
        self.buffers = Buffers.of(app).attach(self.trainers, every=set(names) == set(app.trainers))
        self.runs = 0

    def synced_models(self) -> list[str]:
        """Models this process writes: those its trainers use that have a remote copy."""
        used = {n for t in self.trainers.values() for n in t.retrieved_model_names}
        return [n for n in sorted(used) if self.models.data[n].has_inference_model]

    def resume(self) -> None:
        """Load the last checkpoint, if any: models, trainer state and buffers. Called before
        the experience plane takes any batch: one stored before would be replaced by the
        checkpoint's buffer, after it was acknowledged."""
        saved = self.checkpoints.current() if self.checkpoints else None
        if self.checkpoints is not None and saved is not None:
            self.checkpoints.verify(saved)  # ConfigurationError, naming the file, if damaged
            try:
                self._load(saved)
            except Exception as exc:  # a checkpoint from before manifests, or another app
                raise ConfigurationError(
                    f"cannot resume from the checkpoint {saved}: {type(exc).__name__}: {exc}"
                ) from exc
            logger.info("resumed from %s", saved)

    def start(self, stop: threading.Event) -> None:
        """Push every model this process writes (after `resume`); syncs send from now on."""
        self.syncs.started = True
        if self.group is not None:
            self.group.check_same_models(self._layout())
            self.group.replicate(m.model for m in self._torch_models().values())
        self._first_syncs(self.synced_models(), stop)

    def _load(self, saved: Path) -> None:
        for name, model in self.models.data.items():
            if (saved / "models" / f"{name}.safetensors").exists():
                model.load_state(saved / "models" / name)
        self.trainers.load_state(saved / "trainers")
        self.buffers.load_state(saved / "data")  # checked against what the app declares

    def run(
        self,
        stop: threading.Event,
        max_runs: int = 0,
        interval: float = 0.0,
        checkpoint_every: int = 0,
    ) -> None:
        """Run trainers round robin until `stop` is set or `max_runs` runs have completed;
        checkpoint every `checkpoint_every` runs (0: only at the end)."""
        while not self._stopping(stop):
            trained = False
            for name, trainer in self.trainers.items():
                if self._stopping(stop):
                    return
                started = time.perf_counter()
                if not self._run_one(name, trainer):
                    continue
                trained = True
                self.runs += 1
                metrics.RUNS.labels(name).inc()
                logger.info(
                    "trainer %s: run %d in %.2fs", name, self.runs, time.perf_counter() - started
                )
                if checkpoint_every and self.runs % checkpoint_every == 0:
                    try:
                        self.save()
                    except StateWriteError as exc:
                        logger.error("%s; training goes on, the next checkpoint tries again", exc)
                if max_runs and self.runs >= max_runs:
                    stop.set()
                    return
                if interval:
                    stop.wait(interval)
            if not trained:  # every trainer waits for data: look again soon, without spinning
                stop.wait(IDLE_WAIT_S)

    def save(self) -> None:
        """Checkpoint models, trainer state and buffers (safetensors and JSON, no pickle),
        atomically as a whole; the samples queued for the buffers are moved in and saved too.

        Data-parallel ranks first check that they hold the same weights; rank 0 writes.
        StateWriteError when the disk refuses it: the last complete checkpoint is kept."""
        if self.group is not None:
            states = {n: m.model.state_dict() for n, m in self._torch_models().items()}
            self.group.check_in_sync(states)
            if not self.group.is_writer:
                return
        if self.checkpoints is None:
            return

        def fill(directory: Path) -> None:
            (directory / "models").mkdir()
            for name, model in self.models.data.items():
                model.save_state(directory / "models" / name)
            self.trainers.save_state(directory / "trainers")
            self.buffers.users.save_state(directory / "data")

        path = self.checkpoints.write(fill)
        logger.info("checkpoint written to %s after %d runs", path, self.runs)

    def _stopping(self, stop: threading.Event) -> bool:
        if self.group is None:
            return stop.is_set()
        return self.group.agree_to_stop(stop.is_set())

    def _layout(self) -> list[tuple[str, ...]]:
        """What ranks must agree on: every tensor of every model, and the trainers."""
        layout: list[tuple[str, ...]] = [("trainer", name) for name in self.trainers]
        for name, model in self._torch_models().items():
            for key, tensor in model.model.state_dict().items():
                layout.append((name, key, str(tensor.dtype), str(tuple(tensor.shape))))
        return layout

    def _torch_models(self) -> dict[str, TorchTrainingModel[torch.nn.Module]]:
        return {n: m for n, m in self.models.data.items() if isinstance(m, TorchTrainingModel)}

    def _run_one(self, name: str, trainer: Trainer) -> bool:
        def attempt() -> bool:
            with self.syncs.holding() as run:  # a sync() in train() lets the run go on
                ran = trainer.run()
            if ran:
                self._check_sent(trainer, run.sent)
            if run.failed:
                raise SyncFailedError("; ".join(map(str, run.failed)))
            return ran

        ran, error = self._agreed(attempt)
        if self.group is not None and ran:
            self.group.share_buffers(m.model for m in self._torch_models().values())
        if error is not None:
            logger.error("trainer %s: sync failed, will catch up next run: %s", name, error)
        return bool(ran)

    def _check_sent(self, trainer: Trainer, sent: set[str]) -> None:
        """Warn, once a model, where a run's sync sent nothing: the model's class has a
        `sync_impl` of its own that does not call TorchTrainingModel's (PAMIQ's own sync_impl
        copies into a local module; across machines only TorchTrainingModel's sends)."""
        if self.group is not None and not self.group.is_writer:
            return
        synced = self.synced_models()
        for model in trainer.retrieved_model_names:
            if model in sent or model in self._silent or model not in synced:
                continue
            self._silent.add(model)
            logger.warning(
                "model %s: its sync() sent nothing to the inference services: its class's "
                "sync_impl does not call TorchTrainingModel.sync_impl (super().sync_impl), "
                "which is what sends the weights across machines",
                model,
            )

    def _first_syncs(self, names: list[str], stop: threading.Event) -> None:
        """Push each model once before training, in turns: a model no service could take
        yet (none reachable, the served version unreadable) is tried again with the others'
        turns, with backoff, so one model never holds the others back. A model a service
        answered and refused (another layout there) is left to later syncs and the catch-up,
        as after a run's sync: training goes on.

        Raises:
            ConfigurationError: A service answered that this trainer cannot push to it at all
                (its token or certificate is not taken there, or the address serves no sync
                plane): waiting would never end, so the trainer stops, saying which.
        """
        delay = 0.2
        while names and not self._stopping(stop):
            waiting = []
            for name in names:
                model = self.models.data[name]
                assert isinstance(model, TorchTrainingModel)
                _, error = self._agreed(model.sync)
                if isinstance(error, SyncMisconfiguredError):
                    raise ConfigurationError(
                        f"{error}; check --inference, the sync token (--sync-token / "
                        "TRAINER_SYNC_TOKEN) and the TLS files"
                    )
                if isinstance(error, SyncRefusedError):
                    logger.error(
                        "model %s: its first push was refused; training goes on, and later "
                        "syncs push it again: %s",
                        name,
                        error,
                    )
                elif error is not None:
                    logger.warning(
                        "model %s: initial sync failed, retrying in %.1fs: %s", name, delay, error
                    )
                    waiting.append(name)
            names = waiting
            if names:
                stop.wait(delay * random.uniform(0.5, 1.5))
                delay = min(delay * 2, 10.0)

    def _agreed(self, attempt: Callable[[], object]) -> tuple[object, SyncFailedError | None]:
        """Run `attempt` (a trainer run, or a sync) and agree with the other ranks on how its
        sync went: rank 0 alone pushes, and tells them. Raise WriterFencedError on every rank
        when rank 0 was fenced; else return what `attempt` returned (True when it raised) and
        the sync's failure, if it failed."""
        result: object = True
        error: SyncFailedError | None = None
        try:
            result = attempt()
        except SyncFailedError as exc:  # WriterFencedError included
            error = exc
        outcome = (
            Outcome.FENCED
            if isinstance(error, WriterFencedError)
            else Outcome.REFUSED
            if isinstance(error, SyncRefusedError)
            else Outcome.MISCONFIGURED
            if isinstance(error, SyncMisconfiguredError)
            else Outcome.FAILED
            if error is not None
            else Outcome.SYNCED
        )
        if self.group is not None:
            outcome = Outcome(self.group.rank_zero_says(outcome))
        if outcome is Outcome.FENCED:
            if isinstance(error, WriterFencedError):
                raise error
            raise WriterFencedError("rank 0 was fenced: another trainer has taken its models over")
        if outcome is Outcome.REFUSED and error is None:
            error = SyncRefusedError("rank 0's sync was refused (see its log)")
        if outcome is Outcome.FAILED and error is None:
            error = SyncFailedError("rank 0's sync failed (see its log)")
        if outcome is Outcome.MISCONFIGURED and error is None:
            error = SyncMisconfiguredError("rank 0 cannot push to a service (see its log)")
        return result, error
