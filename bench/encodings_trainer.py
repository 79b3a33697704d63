"""The trainer side of bench/encodings.py `--lab`, run inside the lab's trainer host
(`python -m bench.encodings --lab-drive SPEC`): each case's steps pushed to the replicas, and
after (or before: every other step) each measured one, the same trained weights pushed whole in
fp32 to another model (`lab_whole`) by another writer, the yardstick measured alongside, so a
load that drifts during the run weighs on both alike; one JSON line per figure."""

from __future__ import annotations

import json
import logging
import os
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from bench.encodings_model import LAB_BF16, LAB_FP32, LAB_WHOLE, LabWeights, selected
from bench.labrun import DATA_PORT, SYNC_PORT, publish_watched
from inference_service.client import InferenceClient
from shared.allocator import tune_for_streaming
from shared.settings import ProcessSettings
from shared.weights.served import ServedCasts, served_dtype
from trainer_service import metrics
from trainer_service.publisher import Publisher


def _encoded_totals() -> tuple[float, float, float]:
    """The trainer's dense bytes through the encoders, and its encode seconds (wall, and CPU
    of the encoding threads), so far."""
    totals = []
    for metric in (metrics.ENCODED_BYTES, metrics.ENCODE_SECONDS, metrics.ENCODE_CPU_SECONDS):
        totals.append(
            sum(
                sample.value
                for family in metric.collect()
                for sample in family.samples
                if sample.name.endswith("_total")
            )
        )
    return totals[0], totals[1], totals[2]


def _timed_sync(
    publisher: Any,
    clients: Sequence[Any],
    model: str,
    state: dict[str, torch.Tensor],
    casts: ServedCasts | None = None,
) -> tuple[float, int]:
    """Seconds from sync() called (the trained `state` converted to the served dtype by
    `casts`, then published, as the trainer service does) to every replica serving the new
    version, and the bytes the trainer sent (one payload down a chain)."""
    before = [int(client.metadata(model).versions[0]) for client in clients]

    def sync() -> Any:  # as trainer_service/remote.py does: the converted tensors are handed over
        converted = state if casts is None else casts.state(state)
        owned = [name for name, tensor in converted.items() if tensor is not state[name]]
        return publisher.publish(model, converted, owned=owned)

    report, started, synced, seen = publish_watched(
        clients, model, [version + 1 for version in before], sync
    )
    if report.lagging or any(at is None for at in seen):
        raise RuntimeError(
            f"{model} version {report.version} did not reach every replica: {report}"
        )
    return max(synced, *(at for at in seen if at is not None)) - started, report.payload_bytes


def lab_drive(spec: dict[str, Any]) -> int:
    """The trainer side, inside the trainer host: first `baseline` whole fp32 pushes (the
    yardstick's model warmed up); then per case, `steps` Adam steps, each pushed, and each
    measured one pushed whole in fp32 too. One JSON line per figure."""

    if spec.get("logs"):  # the chosen encodings and their costs are logged at DEBUG
        logging.basicConfig(
            filename=Path(spec["logs"]) / "trainer.log",
            level=logging.DEBUG,
            format="%(asctime)s %(levelname)s %(threadName)s %(name)s: %(message)s",
        )
    # malloc tuned as the trainer service tunes it (shared/process.py)
    tune_for_streaming(ProcessSettings.from_environ(os.environ, "bench").malloc)
    targets = [f"{name}:{SYNC_PORT}" for name in spec["replicas"]]
    clients = [InferenceClient(f"{name}:{DATA_PORT}", timeout_s=60) for name in spec["replicas"]]
    mb, steps = spec["mb"], spec["steps"]
    module = LabWeights(mb)
    params = list(module.parameters())
    whole = Publisher(targets, "bench-whole", push_encoding="whole")
    try:
        g = torch.Generator().manual_seed(2)
        times = []
        for step in range(spec["baseline"] + 1):
            with torch.no_grad():
                for p in params:
                    p.add_(torch.randn(p.shape, generator=g), alpha=1e-3)
            state = {k: v.detach().clone() for k, v in module.state_dict().items()}
            seconds, _ = _timed_sync(whole, clients, LAB_WHOLE, state)
            if step:  # the first is a full push on a fresh connection
                times.append(seconds)
        fp32_bytes = sum(t.numel() * 4 for t in state.values())
        print(json.dumps({"kind": "baseline", "seconds": statistics.mean(times)}), flush=True)
        for case in selected(spec.get("cases")):
            model = LAB_BF16 if case.served is not None else LAB_FP32
            torch.manual_seed(0)
            for p in params:
                with torch.no_grad():
                    p.copy_(torch.randn(p.shape) * 0.02)
            optimizer = torch.optim.Adam(params, lr=case.lr)
            # a writer of its own per case: each starts with a full push
            publisher = Publisher(targets, f"bench-{case.name}", push_encoding=spec["encoding"])
            casts = ServedCasts(case.served)
            g = torch.Generator().manual_seed(1)
            measured: list[float] = []
            yardstick: list[float] = []  # whole fp32 pushes of the same steps
            wire = served_total = 0
            dense0 = enc0 = cpu0 = 0.0
            try:
                for step in range(1, steps + 1):
                    for p in params:
                        p.grad = torch.randn(p.shape, generator=g)
                    optimizer.step()
                    raw = {k: v.detach() for k, v in module.state_dict().items()}
                    if step == 10:
                        dense0, enc0, cpu0 = _encoded_totals()
                    if step >= 10 and step % 2:  # the yardstick first every other step
                        yardstick.append(_timed_sync(whole, clients, LAB_WHOLE, raw)[0])
                    seconds, sent = _timed_sync(publisher, clients, model, raw, casts)
                    if step >= 10 and not step % 2:
                        yardstick.append(_timed_sync(whole, clients, LAB_WHOLE, raw)[0])
                    if step >= 10:
                        measured.append(seconds)
                        wire += sent
                        served_total += sum(  # counted, not converted once more
                            t.numel() * served_dtype(t, case.served).itemsize for t in raw.values()
                        )
                dense1, enc1, cpu1 = _encoded_totals()
            finally:
                publisher.close()
            line = {
                "kind": "case",
                "case": case.name,
                "seconds": statistics.mean(measured),
                "whole_seconds": statistics.mean(yardstick),
                "wire": wire,
                "whole": fp32_bytes * len(measured) if case.versus_fp32 else served_total,
                "encode_gbps": (dense1 - dense0) / max(enc1 - enc0, 1e-9) / 1e9,
                "encode_cpu_gbps": (dense1 - dense0) / max(cpu1 - cpu0, 1e-9) / 1e9,
                "encoded_bytes": dense1 - dense0,
            }
            print(json.dumps(line), flush=True)
    finally:
        whole.close()
        for client in clients:
            client.close()
    return 0
