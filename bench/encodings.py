"""What the element-level encodings and the served dtype save on a link, on real optimizer steps.

For each case, a model of `--mb` MiB of fp32 weights takes `--steps` Adam steps on random
gradients; after each, the version the trainer would push (its weights converted to the served
dtype) is compared with the one before, and every tensor is encoded as the trainer's cost model
chooses on a link of `--link-gbit` (trainer_service/encoding_choice.py, the link rate set
instead of measured). Averaged over steps 10 to the last, it prints

    wire step=<case> link=1gbit bytes_ratio=X freshness_ratio=Y encode_gbps=Z

- bytes_ratio: wire bytes over the whole tensors of the served dtype (for `fp32_served_bf16`,
  over whole fp32 tensors: what the served dtype alone saves);
- freshness_ratio: the time a push takes now (measured encode and decode seconds, plus the wire
  bytes at the link rate) over today's push of whole fp32 tensors; below 1 is fresher;
- encode_gbps: dense tensor bytes per second through the encoder (choice included).

Cases: `bf16_adam_lr1e-6` (served bf16, a few percent of elements move per step),
`fp32_adam_lr1e-3` (served fp32, most elements move) and `fp32_served_bf16` (Adam lr 1e-4,
served bf16). First, each encoder's own speed on 128 MiB of bf16 with 3% of elements changed:

    encoder encoding=sparse changed=3% encode_gbps=Z decode_gbps=W

(numpy runs on one core; zstd compresses on several threads.)

    python -m bench.encodings [--mb 256] [--steps 20] [--link-gbit 1]

`--lab` measures the same cases across the host lab (bench/hostlab.py, root): a trainer host
and `--replicas` replica hosts on `--rate` links, each replica an inference service serving
this module's `lab_app` (the model as `lab_bf16`, served in bf16, and `lab_fp32`). Inside the
trainer host a Publisher (`--push-encoding auto`, chain fan-out) pushes each step's state,
converted to the served dtype, and a client polls every replica's ModelMetadata; freshness is
measured, from `sync()` called to every replica serving the version, averaged over steps 10 to
the last, and compared with pushes of whole fp32 tensors (`--push-encoding whole`) in the same
run. encode_gbps is the trainer's own (dense bytes through the encoder over its seconds, from
its metrics).

    python -m bench.encodings --lab [--mb 256] [--steps 20] [--replicas 3] [--rate 1gbit]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from typing_extensions import override

from shared import App, TensorSpec, TorchTrainingModel
from shared.weights.encoding import ENCODINGS, decode, encode
from shared.weights.served import served_state
from trainer_service import metrics
from trainer_service.encoding_choice import EncodingChooser, host_bytes

TARGET = "10.0.0.1:50052"  # a name for the link; nothing is dialled
TENSOR_MB = 16  # the model is cut into tensors of this size


@dataclass(frozen=True)
class Case:
    name: str
    lr: float
    served: torch.dtype | None  # None: as trained (fp32)
    versus_fp32: bool  # bytes_ratio against whole fp32 tensors rather than served ones


CASES = (
    Case("bf16_adam_lr1e-6", 1e-6, torch.bfloat16, False),
    Case("fp32_adam_lr1e-3", 1e-3, None, False),
    Case("fp32_served_bf16", 1e-4, torch.bfloat16, True),
)


def weights(mb: int) -> list[torch.nn.Parameter]:
    torch.manual_seed(0)
    count = max(1, mb // TENSOR_MB)
    per = min(mb, TENSOR_MB) * (1 << 20) // 4
    return [torch.nn.Parameter(torch.randn(per) * 0.02) for _ in range(count)]


def encoder_speeds(elements: int = 64 << 20, changed: float = 0.03) -> None:
    """Each encoder on `elements` bf16 values, `changed` of them moved: wall-clock speeds, and
    encode_cpu_gbps over the CPU seconds of this process (what one core does, where the
    machine is shared)."""
    rng = np.random.default_rng(0)
    base = rng.integers(0, 1 << 16, elements, dtype=np.uint16)
    new = base.copy()
    moved = rng.random(elements) < changed
    new[moved] ^= rng.integers(1, 1 << 8, int(moved.sum()), dtype=np.uint16)
    new_bytes, base_bytes = new.view(np.uint8), base.view(np.uint8)
    out = np.empty_like(new_bytes)
    for encoding in ENCODINGS:
        began, cpu = time.perf_counter(), time.process_time()
        data = encode(encoding, new_bytes, base_bytes, 2)
        encoded = time.perf_counter() - began
        encoded_cpu = time.process_time() - cpu
        assert data is not None
        began = time.perf_counter()
        decode(encoding, data, base_bytes, 2, out)
        decoded = time.perf_counter() - began
        assert out.tobytes() == new_bytes.tobytes()
        print(
            f"encoder encoding={encoding} changed={changed:.0%} "
            f"encode_gbps={new_bytes.nbytes / encoded / 1e9:.2f} "
            f"encode_cpu_gbps={new_bytes.nbytes / max(encoded_cpu, 1e-9) / 1e9:.2f} "
            f"decode_gbps={new_bytes.nbytes / decoded / 1e9:.2f} "
            f"bytes_ratio={len(data) / new_bytes.nbytes:.4f}",
            flush=True,
        )


def measure(case: Case, mb: int, steps: int, link: float, verbose: bool = False) -> str:
    params = weights(mb)
    optimizer = torch.optim.Adam(params, lr=case.lr)
    chooser = EncodingChooser("auto")
    chooser.record_push(TARGET, 1 << 30, (1 << 30) / link)  # the link rate, as if measured
    chooser.calibrate()  # once per trainer, not per push
    g = torch.Generator().manual_seed(1)
    previous: dict[str, torch.Tensor] | None = None
    wire = whole = fp32 = dense = 0
    seconds = encode_seconds = 0.0
    for step in range(1, steps + 1):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        optimizer.step()
        state = {f"w{i}": p.detach() for i, p in enumerate(params)}
        version = {k: v.clone() for k, v in served_state(state, case.served).items()}
        if previous is not None and step >= 10:
            changed = [(k, v) for k, v in version.items() if not torch.equal(v, previous[k])]
            encoded = chooser.encode(TARGET, changed, previous)
            if verbose:
                print(f"  step {step}: {encoded.summary()} in {encoded.seconds:.3f}s")
            decode_seconds = 0.0
            sent = 0
            for name, tensor in changed:
                nbytes = tensor.numel() * tensor.element_size()
                if name not in encoded.tensors:
                    sent += nbytes
                    continue
                encoding, data = encoded.tensors[name]
                sent += len(data)
                out = np.empty(nbytes, np.uint8)
                began = time.perf_counter()
                decode(encoding, data, host_bytes(previous[name]), tensor.element_size(), out)
                decode_seconds += time.perf_counter() - began
                assert out.tobytes() == host_bytes(tensor).tobytes(), name
            step_whole = sum(t.numel() * t.element_size() for t in version.values())
            step_fp32 = sum(t.numel() * 4 for t in state.values())
            wire += sent
            whole += step_whole
            fp32 += step_fp32
            dense += sum(t.numel() * t.element_size() for _, t in changed)
            encode_seconds += encoded.seconds
            seconds += encoded.seconds + sent / link + decode_seconds
        previous = version
    bytes_ratio = wire / (fp32 if case.versus_fp32 else whole)
    freshness = seconds / (fp32 / link)
    gbps = dense / max(encode_seconds, 1e-9) / 1e9
    return (
        f"wire step={case.name} link={link * 8 / 1e9:g}gbit bytes_ratio={bytes_ratio:.4f} "
        f"freshness_ratio={freshness:.4f} encode_gbps={gbps:.2f}"
    )


# -- across the host lab -------------------------------------------------------------------------

LAB_BF16, LAB_FP32 = "lab_bf16", "lab_fp32"
DATA_PORT, SYNC_PORT = 8001, 9001


class LabWeights(nn.Module):
    """`BENCH_ENC_MB` MiB of fp32 weights in tensors of TENSOR_MB MiB; output: one sum."""

    def __init__(self, mb: int | None = None) -> None:
        super().__init__()
        mb = mb if mb is not None else int(os.environ.get("BENCH_ENC_MB", "256"))
        count = max(1, mb // TENSOR_MB)
        per = min(mb, TENSOR_MB) * (1 << 20) // 4
        self.w = nn.ParameterList([nn.Parameter(torch.zeros(per)) for _ in range(count)])

    @override
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = x * 0 + self.w[0][0].float()
        return out


def _serve(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out: torch.Tensor = module(x).float()
    return out


lab_app = App()
for _name, _dtype in ((LAB_BF16, torch.bfloat16), (LAB_FP32, None)):
    lab_app.add_model(
        _name,
        lambda: TorchTrainingModel(LabWeights(), inference_procedure=_serve),
        inputs=[TensorSpec("x", "FP32", (-1, 1))],
        outputs=[TensorSpec("y", "FP32", (-1, 1))],
        served_dtype=_dtype,
    )


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
    served: torch.dtype | None = None,
) -> tuple[float, int]:
    """Seconds from sync() called (the trained `state` converted to the `served` dtype, then
    published, as the trainer service does) to every replica serving the new version, and the
    bytes the trainer sent (one payload down a chain)."""
    before = [int(client.metadata(model).versions[0]) for client in clients]
    seen: list[float | None] = [None] * len(clients)
    done = threading.Event()

    def watch(index: int) -> None:
        while not done.is_set():
            if int(clients[index].metadata(model).versions[0]) > before[index]:
                seen[index] = time.perf_counter()
                return
            done.wait(0.005 * len(clients))

    watchers = [threading.Thread(target=watch, args=(i,)) for i in range(len(clients))]
    for watcher in watchers:
        watcher.start()
    started = time.perf_counter()
    try:
        report = publisher.publish(model, served_state(state, served))
        synced = time.perf_counter()
        for watcher in watchers:
            watcher.join(timeout=120)
    finally:
        done.set()
    if report.lagging or any(at is None for at in seen):
        raise RuntimeError(
            f"{model} version {report.version} did not reach every replica: {report}"
        )
    return max(synced, *(at for at in seen if at is not None)) - started, report.payload_bytes


def lab_drive(spec: dict[str, Any]) -> int:
    """The trainer side, inside the trainer host: per case, `steps` Adam steps, each pushed;
    then whole fp32 pushes for the baseline. One JSON line per figure."""
    from inference_service.client import InferenceClient
    from trainer_service.publisher import Publisher

    targets = [f"{name}:{SYNC_PORT}" for name in spec["replicas"]]
    clients = [InferenceClient(f"{name}:{DATA_PORT}", timeout_s=60) for name in spec["replicas"]]
    mb, steps = spec["mb"], spec["steps"]
    module = LabWeights(mb)
    params = list(module.parameters())
    try:
        whole = Publisher(targets, "bench-whole", push_encoding="whole")
        try:
            g = torch.Generator().manual_seed(2)
            times = []
            for step in range(spec["baseline"] + 1):
                with torch.no_grad():
                    for p in params:
                        p.add_(torch.randn(p.shape, generator=g), alpha=1e-3)
                state = {k: v.detach().clone() for k, v in module.state_dict().items()}
                seconds, _ = _timed_sync(whole, clients, LAB_FP32, state)
                if step:  # the first is a full push on a fresh connection
                    times.append(seconds)
            fp32_bytes = sum(t.numel() * 4 for t in state.values())
            print(json.dumps({"kind": "baseline", "seconds": statistics.mean(times)}), flush=True)
        finally:
            whole.close()
        for case in CASES:
            model = LAB_BF16 if case.served is not None else LAB_FP32
            torch.manual_seed(0)
            for p in params:
                with torch.no_grad():
                    p.copy_(torch.randn(p.shape) * 0.02)
            optimizer = torch.optim.Adam(params, lr=case.lr)
            # a writer of its own per case: each starts with a full push
            publisher = Publisher(targets, f"bench-{case.name}", push_encoding=spec["encoding"])
            g = torch.Generator().manual_seed(1)
            measured: list[float] = []
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
                    seconds, sent = _timed_sync(publisher, clients, model, raw, case.served)
                    if step >= 10:
                        measured.append(seconds)
                        wire += sent
                        served_total += sum(
                            t.numel() * t.element_size()
                            for t in served_state(raw, case.served).values()
                        )
                dense1, enc1, cpu1 = _encoded_totals()
            finally:
                publisher.close()
            line = {
                "kind": "case",
                "case": case.name,
                "seconds": statistics.mean(measured),
                "wire": wire,
                "whole": fp32_bytes * len(measured) if case.versus_fp32 else served_total,
                "encode_gbps": (dense1 - dense0) / max(enc1 - enc0, 1e-9) / 1e9,
                "encode_cpu_gbps": (dense1 - dense0) / max(cpu1 - cpu0, 1e-9) / 1e9,
                "encoded_bytes": dense1 - dense0,
            }
            print(json.dumps(line), flush=True)
    finally:
        for client in clients:
            client.close()
    return 0


def lab_run(args: argparse.Namespace) -> int:
    """The lab: replicas started in their hosts, the trainer side run in its own; the lines."""
    from bench.hostlab import HostLab, rate_bits
    from bench.netns import LabUnavailableError
    from devtools import launch

    root = Path(__file__).resolve().parent.parent
    names = [f"replica{i}" for i in range(1, args.replicas + 1)]
    env = {**os.environ, "BENCH_ENC_MB": str(args.mb), "PYTHONPATH": str(root)}
    try:
        lab = HostLab(["trainer", *names], rate=args.rate)
        lab.start()
    except LabUnavailableError as error:
        print(f"encodings: the host lab cannot run here: {error}")
        return 2
    link = rate_bits(args.rate) / 8
    print(
        f"# lab: trainer + {len(names)} replica(s), chain fan-out, link={args.rate}, "
        f"{args.mb} MiB fp32 model, steps 10 to {args.steps} measured; load {os.getloadavg()}",
        flush=True,
    )
    with (
        tempfile.TemporaryDirectory() as tmp,
        lab,
        launch.Launcher(args.logs or Path(tmp), env, grace=30) as launcher,
    ):
        started = []
        for name in names:
            address = lab.address(name)
            ready = launcher.directory / f"{name}.ready.json"
            command = launch.inference_command(
                "bench.encodings:lab_app",
                ready,
                *("--log-level", "INFO" if args.logs else "WARNING", "--metrics-listen", "off"),
                *("--listen", f"{address}:{DATA_PORT}", "--sync-listen", f"{address}:{SYNC_PORT}"),
                *("--sync-nice", "0", "--allow-open-sync"),
            )
            started.append((name, ready, launcher.spawn(lab.command(name, command), name)))
        for name, ready, process in started:
            launch.wait_for(
                process,
                functools.partial(launch.read_json, ready),
                what=f"inference service on {name}",
                timeout=600,
                log=launcher.log_path(name),
            )
        spec = {
            "mb": args.mb,
            "steps": max(args.steps, 11),
            "replicas": names,
            "baseline": args.baseline,
            "encoding": args.push_encoding,
            "logs": str(args.logs.resolve()) if args.logs else None,
        }
        trainer = lab.run(
            "trainer",
            [sys.executable, "-m", "bench.encodings", "--lab-drive", json.dumps(spec)],
            env=env,
            cwd=root,
            stdout=subprocess.PIPE,
            text=True,
        )
        out, _ = trainer.communicate()
        if trainer.returncode != 0:
            print(f"encodings: the trainer side exited with {trainer.returncode}")
            return 1
    results = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    baseline = next(r["seconds"] for r in results if r["kind"] == "baseline")
    fp32_bytes = args.mb * (1 << 20)
    print(
        f"# whole fp32 pushes: {baseline:.3f}s from sync() to all serving "
        f"({fp32_bytes / link:.3f}s of wire)",
        flush=True,
    )
    for r in results:
        if r["kind"] != "case":
            continue
        print(
            f"wire step={r['case']} link={args.rate} bytes_ratio={r['wire'] / r['whole']:.4f} "
            f"freshness_ratio={r['seconds'] / baseline:.4f} encode_gbps={r['encode_gbps']:.2f}"
            f" encode_cpu_gbps={r['encode_cpu_gbps']:.2f}"
            f"  # measured: {r['seconds']:.3f}s per push, {args.replicas} replica(s); "
            f"{r['encoded_bytes'] / 1e6:.0f} MB through the encoders",
            flush=True,
        )
    print(f"# load at the end: {os.getloadavg()}", flush=True)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=256, help="fp32 model size in MiB")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps (>= 11)")
    parser.add_argument("--link-gbit", type=float, default=1.0, help="link rate in Gbit/s")
    parser.add_argument("--verbose", action="store_true", help="each step's encodings")
    parser.add_argument("--lab", action="store_true", help="measure across the host lab")
    parser.add_argument("--replicas", type=int, default=3, help="--lab: replica hosts")
    parser.add_argument("--rate", default="1gbit", help="--lab: every link's rate")
    parser.add_argument("--baseline", type=int, default=4, help="--lab: whole fp32 pushes")
    parser.add_argument(
        "--push-encoding", default="auto", help="--lab: the trainer's --push-encoding"
    )
    parser.add_argument("--logs", type=Path, help="--lab: keep the replicas' logs here")
    parser.add_argument("--lab-drive", help=argparse.SUPPRESS)  # the trainer side, in the lab
    args = parser.parse_args()
    if args.lab_drive:
        return lab_drive(json.loads(args.lab_drive))
    if args.lab:
        return lab_run(args)
    link = args.link_gbit * 1e9 / 8
    encoder_speeds()
    print(f"model: {args.mb} MiB of fp32 weights; steps 10 to {args.steps} measured")
    for case in CASES:
        print(measure(case, args.mb, max(args.steps, 11), link, args.verbose), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
