"""`trainer-service` / `python -m trainer_service`: run an app's trainers and push weights."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from shared.app import App, load_app
from shared.cli import is_loopback
from shared.devices import resolve_device, torch_thread_count
from shared.errors import ConfigurationError, StateWriteError
from shared.grpc.auth import TlsFiles
from shared.grpc.server import write_ready_file
from shared.metrics import serve_metrics
from shared.process import end_process, prepare_process, watch_stop_signals
from shared.statedir import StateDir, claim, claim_first
from trainer_service.distributed import Group, join, rank_device
from trainer_service.experience.buffers import Buffers
from trainer_service.experience.server import STOP_GRACE_S, ExperienceEndpoint, ExperienceServer
from trainer_service.experience.service import ExperiencePlane
from trainer_service.groups import check_groups, group_dirs, member_locks
from trainer_service.publisher import Publisher
from trainer_service.runner import TrainingLoop
from trainer_service.settings import PROG, TrainerSettings
from trainer_service.stopping import Stopping
from trainer_service.sync_errors import WriterFencedError

logger = logging.getLogger("trainer_service")


def run(settings: TrainerSettings) -> None:
    stop = threading.Event()
    watch_stop_signals(stop, "stopping after the run in progress and a checkpoint", "a checkpoint")
    device = rank_device(resolve_device(settings.device))
    # torch's default is one thread per CPU in the affinity mask, a container's CPU quota
    # ignored: training in a `--cpus 2` container on a large host would spin a team of dozens
    torch.set_num_threads(torch_thread_count(settings.torch_threads))
    # The app's imports happen before the group is joined, so a module that reads the default
    # group at import time cannot hold it past the end (see Group.close).
    app = load_app(settings.models)
    group = join(device)  # data-parallel ranks under torchrun; None when run alone
    writes = group is None or group.is_writer
    metrics_port = None
    if (metrics := settings.metrics_listen) and writes:
        metrics_port = listening("--metrics-listen", lambda: serve_metrics(metrics))
        logger.info("metrics on port %d", metrics_port)
    claimed = claim_state(settings, app, group, stop)
    if claimed is None:
        return
    state_dir, trainers, held = claimed
    if (settings.tls_cert is None) != (settings.tls_key is None):
        raise ConfigurationError("--tls-cert and --tls-key go together")
    sync_tls = TlsFiles(settings.tls_cert, settings.tls_key, settings.tls_ca)
    sync_tls.check()  # a bad file stops the start (before the ready file), not the first push
    publisher = Publisher(
        settings.inference,
        settings.writer_id,
        timeout_s=settings.push_timeout,
        connect_timeout_s=settings.connect_timeout,
        push_stall_timeout_s=settings.push_stall_timeout,
        token=settings.sync_token,
        tls=sync_tls,
        fanout=settings.fanout,
        catch_up_from_peers=settings.catch_up_from_peers,
        push_encoding=settings.push_encoding,
        stopping=Stopping(stop, settings.stop_sync_timeout),
    )
    experience: ExperienceServer | None = None
    try:
        loop = TrainingLoop(
            app,
            publisher,
            device,
            trainers,
            state_dir,
            group,
        )
        if settings.trainer_groups is not None:
            check_groups(app, settings.trainer_groups, loop.models)
        loop.resume()  # before the experience plane stores anything in the buffers
        experience = experience_server(settings, loop.buffers, group)
        experience_port = None
        if experience is not None:
            experience_port = listening("--experience-listen", experience.start)
        if settings.ready_file is not None and writes:  # ranks share the flags: rank 0's
            info = {"pid": os.getpid(), "experience_port": experience_port}
            write_ready_file(settings.ready_file, {**info, "metrics_port": metrics_port})
        logger.info(
            "trainer %s: %d trainer(s) on %s (%d torch thread(s)), pushing %s to %s",
            settings.writer_id,
            len(loop.trainers),
            device,
            torch.get_num_threads(),
            ", ".join(loop.synced_models()) or "nothing",
            ", ".join(settings.inference),
        )
        loop.start(stop)
        try:
            loop.run(stop, settings.max_runs, settings.run_interval, settings.checkpoint_every)
        except WriterFencedError:
            # The models are another writer's now, but the samples acknowledged are this
            # trainer's to keep: checkpointed while the directory is still this one's (a
            # standby that made it again after it was deleted holds another).
            if group is None and (held is None or held.still_held()):
                save_after_failure(loop, experience, "was fenced")
            raise
        except Exception:
            if group is None:  # ranks that did not fail would wait in the save's collectives
                save_after_failure(loop, experience, "failed")
            raise
        if experience is not None:  # first: every batch acknowledged is in the last checkpoint
            experience.stop(STOP_GRACE_S)
        loop.save()
        if group is not None:
            group.finish()
    finally:
        if experience is not None:
            experience.stop(0)
        publisher.close()
        if group is not None:
            group.close()


def save_after_failure(loop: TrainingLoop, experience: ExperienceServer | None, what: str) -> None:
    """Checkpoint what the runs before a trainer's failure (or its fencing) did (PAMIQ saves
    its state when a thread fails), the batches acknowledged included, before the error ends
    the process."""
    logger.error("a trainer %s after %d run(s); checkpointing before exiting", what, loop.runs)
    if experience is not None:
        experience.stop(STOP_GRACE_S)
    try:
        loop.save()
    except Exception:
        logger.exception("the checkpoint after the failure could not be written")


def listening(flag: str, start: Callable[[], int]) -> int:
    """Start a server on the address `flag` gives; return its port.

    Raises:
        ConfigurationError: It cannot listen there (the address is in use, or not this host's).
    """
    try:
        return start()
    except OSError as exc:
        raise ConfigurationError(f"{flag}: {exc}") from None


def experience_server(
    settings: TrainerSettings, buffers: Buffers, group: Group | None
) -> ExperienceServer | None:
    """The experience plane for the app's buffers; None when it declares none or the plane is
    off."""
    if not buffers.schemas:
        return None
    if settings.experience_listen is None:
        logger.warning("the app declares buffers but --experience-listen is off: none fills them")
        return None
    if group is not None:
        raise ConfigurationError(
            "experience buffers are not supported with data-parallel ranks yet: each rank "
            "would hold different samples and decide differently whether to train"
        )
    listen = settings.experience_listen
    authenticated = settings.experience_token or settings.experience_tls_client_ca is not None
    if not authenticated and not is_loopback(listen):
        if not settings.allow_open_experience:
            raise ConfigurationError(
                f"the experience plane would listen on {listen} with no authentication: "
                "set TRAINER_EXPERIENCE_TOKEN (or --experience-tls-client-ca for mutual "
                "TLS), or pass --allow-open-experience on a network you trust"
            )
        logger.warning(
            "THE EXPERIENCE PLANE LISTENS ON %s WITHOUT AUTHENTICATION "
            "(--allow-open-experience): anyone who can reach it can feed the trainer.",
            listen,
        )
    tls = TlsFiles(
        settings.experience_tls_cert,
        settings.experience_tls_key,
        settings.experience_tls_client_ca,
    )
    if tls.enabled and (tls.cert is None or tls.key is None):
        raise ConfigurationError(
            "the experience plane's TLS needs --experience-tls-cert and --experience-tls-key"
        )
    plane = ExperiencePlane(buffers.users, buffers.schemas, settings.experience_max_batch)
    endpoint = ExperienceEndpoint(
        listen,
        tls if tls.enabled else None,
        settings.experience_token,
        settings.experience_streams,
        settings.experience_idle_timeout_s,
    )
    return ExperienceServer(plane, endpoint)


def claim_state(
    settings: TrainerSettings, app: App, group: Group | None, stop: threading.Event
) -> tuple[Path | None, Sequence[str] | None, StateDir | None] | None:
    """The state directory this process owns, the trainers it runs and its claim on the
    directory (None where it has none of its own); None if stopped while standing by.

    Trainers sharing a state directory (replicas of one compose service) take turns: one trains
    and writes, the others stand by and take over, from its last checkpoint, when it exits.
    With --trainer-groups, replicas split the groups, one directory per group. Data-parallel
    ranks other than 0 only read rank 0's directory."""
    groups = settings.trainer_groups
    if groups is not None:
        if settings.trainers is not None:
            raise ConfigurationError("give --trainers or --trainer-groups, not both")
        if settings.state_dir is None:
            raise ConfigurationError("--trainer-groups needs --state-dir: groups are claimed there")
        if group is not None:  # every rank refuses: rank 0 alone would wait on the others
            raise ConfigurationError("--trainer-groups cannot split data-parallel ranks")
        candidates = group_dirs(app, groups, settings.state_dir)
        members = member_locks(groups, settings.state_dir)
        found = claim_first(candidates, wait=stop, members=members)
        if found is None:
            return None
        index, state = found
        logger.info("running trainer group %s", ", ".join(groups[index]))
        return state.path, groups[index], state
    if settings.state_dir is None or (group is not None and not group.is_writer):
        return settings.state_dir, settings.trainers, None
    held = claim(settings.state_dir, wait=stop)
    return None if held is None else (held.path, settings.trainers, held)


def main(argv: Sequence[str] | None = None) -> int:
    settings = TrainerSettings.from_args(argv, os.environ)
    prepare_process(PROG, settings.log_level)
    try:
        run(settings)
    except ConfigurationError as exc:
        logger.error("%s", exc)
        return 2
    except WriterFencedError as exc:
        logger.error("stopping: %s", exc)
        return 3
    except StateWriteError as exc:  # the checkpoint at exit
        logger.error("stopping: %s", exc)
        return 4
    return 0


if __name__ == "__main__":
    end_process(main())
