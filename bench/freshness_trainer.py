"""The trainer side of bench/freshness.py, run inside the lab's trainer host
(`python -m bench.freshness --drive SPEC`): publishers to the replicas by host name, a client
polling every replica, one JSON line per figure."""

from __future__ import annotations

import json
import logging
import os
import statistics
import subprocess
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
import torch

from bench.apps import Stamp
from bench.labrun import DATA_PORT, POLL_S, SYNC_PORT, publish_watched, replica_names
from inference_service.client import InferenceClient
from shared.allocator import tune_for_streaming
from shared.gen.weightsync.v1 import weightsync_pb2 as pb
from shared.gen.weightsync.v1 import weightsync_pb2_grpc as pb_grpc
from shared.settings import ProcessSettings
from trainer_service.publisher import Publisher

MODEL = "stamp"


def fill(state: dict[str, torch.Tensor], value: float) -> None:
    """One training step of the stamp model: every tensor, whole, takes `value`."""
    with torch.no_grad():
        for tensor in state.values():
            tensor.fill_(value)


def push_and_watch(
    publisher: Publisher, clients: Sequence[InferenceClient], state: dict[str, torch.Tensor]
) -> dict[str, float]:
    """One sync, timed from the trainer and from a client polling every replica."""
    expected = publisher.version(MODEL) + 1
    report, started, synced, seen = publish_watched(
        clients, MODEL, [expected] * len(clients), lambda: publisher.publish(MODEL, state)
    )
    if report.version != expected or report.targets != len(clients) or report.lagging:
        raise RuntimeError(f"push of version {expected} did not reach every replica: {report}")
    if any(at is None for at in seen):
        raise RuntimeError(f"version {expected}: a replica was never seen serving it: {seen}")
    served = max(at for at in seen if at is not None)
    return {
        "version": report.version,
        "sync_s": synced - started,
        "served_s": served - started,
        "seconds": max(synced, served) - started,
    }


def cross_check(clients: Sequence[InferenceClient], version: int, value: float) -> None:
    """Every replica answers with `version`, computed on weights that are all `value`."""
    for client in clients:
        result = client.infer(MODEL, {"x": torch.zeros(1, 8)})
        means = torch.as_tensor(result.outputs["means"]).reshape(-1)
        if result.version != version or not torch.allclose(means, torch.full_like(means, value)):
            raise RuntimeError(
                f"{client}: answered version {result.version} with means {means.tolist()}, "
                f"expected version {version} at {value}"
            )


def publish_timed(publisher: Publisher, state: dict[str, torch.Tensor]) -> tuple[Any, float]:
    """One sync: its report and its seconds."""
    started = time.perf_counter()
    report = publisher.publish(MODEL, state)
    return report, time.perf_counter() - started


def link(command: str, cut: dict[str, str]) -> None:
    """The cut replica's switch port `down` or `up` (bench/hostlab.py `cut`, `restore`)."""
    argv = ["ip", "-n", cut["switch"], "link", "set", cut["port"], command]
    subprocess.run(argv, check=True, capture_output=True)


def cut_mid_push(cut: dict[str, Any], version: int, normal_s: float) -> None:
    """Cut the replica's link once it has received the fraction `cut["at"]` of `version`'s
    payload (its sync plane's GetModel says so), or after a normal push's time at the latest."""
    channel = grpc.insecure_channel(f"{cut['name']}:{SYNC_PORT}")
    stub = pb_grpc.WeightSyncStub(channel)
    deadline = time.perf_counter() + normal_s
    try:
        while time.perf_counter() < deadline:
            state = stub.GetModel(pb.GetModelRequest(model_name=MODEL), timeout=5)
            pending = state.pending
            if (
                pending.version == version
                and pending.bytes_received > 0
                and (pending.bytes_received >= float(cut["at"]) * pending.payload_bytes)
            ):
                break
            time.sleep(POLL_S)
    finally:
        channel.close()
        link("down", cut)


def serves(client: InferenceClient, version: int, within_s: float) -> float | None:
    """When `client`'s replica was seen serving `version` or newer (perf_counter; None: not
    within `within_s` seconds)."""
    started = time.perf_counter()
    while time.perf_counter() - started < within_s:
        try:
            if int(client.metadata(MODEL).versions[0]) >= version:
                return time.perf_counter()
        except Exception:  # not answering yet: its link just came back
            pass
        time.sleep(POLL_S)
    return None


def cut_scenario(
    publisher: Publisher,
    clients: Sequence[InferenceClient],
    state: dict[str, torch.Tensor],
    value: float,
    normal_s: float,
    cut: dict[str, Any],
) -> dict[str, Any]:
    """One replica's link cut mid-push: how long the others take to commit and serve it, then
    the link restored and one more sync: whether the cut one serves the newest version by the
    time that sync is done (plus one normal freshness for its data plane to show it)."""
    index = int(cut["index"])
    others = [c for i, c in enumerate(clients) if i != index]
    fill(state, value)
    expected = publisher.version(MODEL) + 1
    cutter = threading.Thread(target=cut_mid_push, args=(cut, expected, normal_s))
    cutter.start()
    try:
        report, others_s = publish_timed(publisher, state)
    finally:
        cutter.join()
    cross_check(others, report.version, value)
    lagging = list(report.lagging)
    link("up", cut)
    restored = time.perf_counter()
    fill(state, value + 1)
    after, after_s = publish_timed(publisher, state)
    synced = time.perf_counter()
    seen = serves(clients[index], after.version, 60.0)
    if seen is not None:
        cross_check([clients[index]], after.version, value + 1)
    return {
        "kind": "cut",
        "replicas": len(clients),
        "cut": cut["name"],
        "cut_at": float(cut["at"]),
        "others_s": others_s,
        "normal_s": normal_s,
        "lagging": lagging,
        "committed": report.targets,
        "next_sync_s": after_s,
        "caught_up": seen is not None and seen - synced <= normal_s,
        "after_restore_s": None if seen is None else seen - restored,
    }


def combined(cuts: list[dict[str, Any]]) -> dict[str, Any]:
    """The cut scenario's runs as one figure: the medians of the times, each run's own time
    (`others_all`), and in how many runs the cut one caught up within one sync."""
    if "error" in cuts[0]:
        return cuts[0]
    return {
        **cuts[0],
        "others_s": statistics.median(c["others_s"] for c in cuts),
        "next_sync_s": statistics.median(c["next_sync_s"] for c in cuts),
        "others_all": [c["others_s"] for c in cuts],
        "caught_up": all(c["caught_up"] for c in cuts),
        "caught_up_runs": sum(bool(c["caught_up"]) for c in cuts),
        "lagging": sorted({lag for c in cuts for lag in c["lagging"]}),
        "committed": min(c["committed"] for c in cuts),
    }


def drive(spec: dict[str, Any]) -> int:
    """The trainer side: for each fan-out and replica count, a publisher to that many replicas,
    a warm-up push, then `repeat` timed pushes; one JSON line per figure, and one for the cut
    scenario where `spec` asks for it."""
    if spec.get("logs"):
        logging.basicConfig(
            filename=Path(spec["logs"]) / "trainer.log",
            level=logging.INFO,
            format="%(asctime)s %(name)s %(levelname)s %(message)s",
        )
    tune_for_streaming(ProcessSettings.from_environ(os.environ, "bench").malloc)
    state = {k: v.detach() for k, v in Stamp(spec["mib"]).state_dict().items()}
    value = float(spec["base"])
    cut = spec.get("cut")
    for fanout in spec["fanouts"]:
        for count in spec["replicas"]:
            names = replica_names(count)
            publisher = Publisher([f"{n}:{SYNC_PORT}" for n in names], "freshness", fanout=fanout)
            clients = [InferenceClient(f"{n}:{DATA_PORT}", timeout_s=60) for n in names]
            try:
                value += 1
                fill(state, value)
                publisher.publish(MODEL, state)  # warm-up: connections, first (full) push
                runs = []
                for _ in range(spec["repeat"]):
                    value += 1
                    fill(state, value)
                    run = push_and_watch(publisher, clients, state)
                    cross_check(clients, int(run["version"]), value)
                    runs.append(run)
                figures = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
                line = {"kind": "freshness", "fanout": fanout, "replicas": count, **figures}
                print(json.dumps(line), flush=True)
                if cut and count == cut["replicas"]:
                    cuts = []
                    for _ in range(spec["repeat"]):
                        value += 1
                        try:
                            cuts.append(
                                cut_scenario(
                                    publisher, clients, state, value, figures["seconds"], cut
                                )
                            )
                        except Exception as error:  # reported: the figure says what went wrong
                            cuts = [{"kind": "cut", "replicas": count, "error": repr(error)}]
                            link("up", cut)
                            break
                        value += 2  # the cut push, the sync after the restore; then one
                        fill(state, value)  # more, so that the cut one rejoins the chain
                        publisher.publish(MODEL, state)
                    print(json.dumps({**combined(cuts), "fanout": fanout}), flush=True)
            finally:
                publisher.close()
                for client in clients:
                    client.close()
    return 0
