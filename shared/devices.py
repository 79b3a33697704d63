"""Device and CPU sizing for both services."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping

import torch

from shared.cpus import available_cpus
from shared.errors import ConfigurationError

# The most intra-op threads a process may ask torch for: far beyond any host's cores, and far
# below where starting them fails ("can't start new thread", then a crash in OpenMP).
MAX_TORCH_THREADS = 1024


def resolve_device(name: str) -> torch.device:
    """`auto` picks CUDA when present, else the CPU; otherwise `cpu`, `cuda` or `cuda:N`."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigurationError(
            f"unknown device {name!r}; use auto, cpu, cuda or cuda:N"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigurationError(f"device {name!r} was asked for but CUDA is not available")
    if device.type not in ("cpu", "cuda"):
        raise ConfigurationError(f"device {name!r}: only cpu and cuda are supported")
    return device


def torch_thread_count(threads: int, environ: Mapping[str, str] = os.environ) -> int:
    """The intra-op thread count to use: `threads` if given, else OMP_NUM_THREADS where it is
    a positive number (torchrun sets 1 for several ranks on one host), else one per CPU the
    process may use (`available_cpus`, container quota included)."""
    if threads:
        return threads
    given = environ.get("OMP_NUM_THREADS", "").strip()
    if given.isdigit() and int(given) > 0:
        return int(given)
    return available_cpus()


def size_torch_threads(threads: int) -> int:
    """Give torch `torch_thread_count(threads)` intra-op threads and one inter-op thread
    (requests already run in parallel on the server's threads); returns the number used."""
    count = torch_thread_count(threads)
    torch.set_num_threads(count)
    # Raises when already set, or once parallel work has run in this process: keep what is.
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(1)
    return count


def use_torch_threads() -> None:
    """Apply the process's intra-op thread count (`size_torch_threads`) in the calling thread;
    call it first in every thread that runs models.

    OpenMP's and MKL's thread counts are per thread, and torch applies its count to a thread
    only when one of its own parallel loops first runs there: until then MKL's matrix products
    in a thread the caller started use OpenMP's default, a team as large as the affinity mask.
    With `--torch-threads 1`, or a container CPU quota below the host's CPU count, the batcher's
    `nn.Linear` then ran on a team larger than the CPUs it may use, and each spun in OpenMP's
    barrier for its absent mates: on this project's 2-core machine, a CPU set narrowed after
    start-up took a 64 -> 256 -> 10 MLP's forward from 22 us to 16 ms, and serving it from
    2,300 to 230 requests/s."""
    torch.set_num_threads(torch.get_num_threads())  # get: torch's lazy per-thread set-up
