"""The device a data-parallel rank trains on, chosen before the app is imported."""

from __future__ import annotations

import pytest
import torch

from trainer_service.distributed import rank_device


def test_a_process_run_alone_keeps_the_device_it_was_given(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert rank_device(torch.device("cpu")) == torch.device("cpu")
    assert rank_device(torch.device("cuda", 0)) == torch.device("cuda", 0)


def test_cpu_ranks_share_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert rank_device(torch.device("cpu")) == torch.device("cpu")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_cuda_rank_takes_its_local_rank_gpu_and_makes_it_current(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    last = torch.cuda.device_count() - 1
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", str(last))
    before = torch.cuda.current_device()
    try:
        assert rank_device(torch.device("cuda")) == torch.device("cuda", last)
        assert torch.cuda.current_device() == last
    finally:
        torch.cuda.set_device(before)
