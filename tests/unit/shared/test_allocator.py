"""When shared/allocator.py tunes glibc's malloc, and when it leaves it to the user."""

from __future__ import annotations

import ctypes

import pytest

from shared.allocator import MMAP_THRESHOLD, TRIM_THRESHOLD, tune_for_streaming


def is_glibc() -> bool:
    try:
        ctypes.CDLL(None).gnu_get_libc_version  # noqa: B018
    except (OSError, AttributeError):
        return False
    return True


def test_weightsync_malloc_default_keeps_glibcs_own() -> None:
    assert tune_for_streaming("default", {}) is None


@pytest.mark.parametrize(
    "environ",
    [
        {"MALLOC_TRIM_THRESHOLD_": "1000000"},
        {"MALLOC_MMAP_THRESHOLD_": "1000000"},
        {"MALLOC_TOP_PAD_": "0"},
        {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1000000"},
        {"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"},
    ],
)
def test_settings_the_user_made_are_kept(environ: dict[str, str]) -> None:
    assert tune_for_streaming("tuned", environ) is None


@pytest.mark.skipif(not is_glibc(), reason="glibc only")
def test_glibc_takes_the_thresholds() -> None:
    settings = tune_for_streaming("tuned", {"GLIBC_TUNABLES": "glibc.pthread.rseq=0"})
    assert settings == {"mmap_threshold": MMAP_THRESHOLD, "trim_threshold": TRIM_THRESHOLD}
