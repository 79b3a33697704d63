"""Do lossless encodings of changed tensors pay on real training updates? (fp32 and bf16)

For one optimizer step (SGD and Adam) on a small MLP trained on random data, each changed tensor
is encoded as: whole (what a delta sends today); XOR with the base version, zstd level 1; and
sparse (int32 index + value of each changed element). Prints the wire ratio of each against whole
and the encode throughput; an encoding pays only if it is smaller AND encodes faster than the wire
moves the bytes it saves (about 1 GB/s per stream on loopback here).

    python -m bench.encodings
"""

from __future__ import annotations

import time

import numpy as np
import torch
import zstandard
from torch import nn


def model(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(1024, 4096), nn.GELU(), nn.Linear(4096, 4096), nn.GELU(), nn.Linear(4096, 1024)
    ).to(dtype)


def step(net: nn.Module, optimizer: torch.optim.Optimizer, dtype: torch.dtype) -> None:
    x = torch.randn(64, 1024, dtype=dtype)
    loss = net(x).float().pow(2).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def measure(dtype: torch.dtype, optimizer_name: str) -> None:
    net = model(dtype)
    optimizer: torch.optim.Optimizer = (
        torch.optim.SGD(net.parameters(), lr=1e-3)
        if optimizer_name == "sgd"
        else torch.optim.Adam(net.parameters(), lr=1e-4)
    )
    step(net, optimizer, dtype)  # warm the optimizer state
    before = {k: v.detach().clone() for k, v in net.state_dict().items()}
    step(net, optimizer, dtype)
    after = {k: v.detach().clone() for k, v in net.state_dict().items()}
    compressor = zstandard.ZstdCompressor(level=1, threads=0)
    whole = xor = sparse = 0
    changed_elements = total_elements = 0
    xor_seconds = 0.0
    for name, new in after.items():
        old = before[name]
        new_bytes = new.contiguous().view(torch.uint8).numpy()
        old_bytes = old.contiguous().view(torch.uint8).numpy()
        whole += new_bytes.nbytes
        started = time.perf_counter()
        xor += len(compressor.compress(np.bitwise_xor(new_bytes, old_bytes).tobytes()))
        xor_seconds += time.perf_counter() - started
        changed = int((new.view(-1) != old.view(-1)).sum())
        changed_elements += changed
        total_elements += new.numel()
        sparse += changed * (4 + new.element_size())
    label = f"{str(dtype).removeprefix('torch.')} {optimizer_name}"
    print(
        f"{label:14} changed_elements={changed_elements / total_elements:6.1%}  "
        f"xor_zstd_ratio={xor / whole:.3f} ({whole / xor_seconds / 1e9:.2f} GB/s encode)  "
        f"sparse_ratio={sparse / whole:.3f}"
    )


def main() -> None:
    for dtype in (torch.float32, torch.bfloat16):
        for optimizer in ("sgd", "adam"):
            measure(dtype, optimizer)


if __name__ == "__main__":
    main()
