"""bench/encodings.py without `--lab`: each encoder's own speed, and the encodings the trainer's
cost model chooses on real optimizer steps, timed in this process."""

from __future__ import annotations

import time

import numpy as np
import torch

from bench.encodings_model import TENSOR_MB, Case
from shared.weights.encoding import ENCODINGS, decode, encode
from shared.weights.served import served_state
from trainer_service.encoding_choice import EncodingChooser, host_bytes

TARGET = "10.0.0.1:50052"  # a name for the link; nothing is dialled


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
