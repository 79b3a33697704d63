"""The cost model's speeds (trainer_service/encoding_costs.py): calibrated alike for every
encoding, scaled alike by what real encodes reach."""

from __future__ import annotations

import pytest

from shared.weights.encoding import SPARSE, XOR_LZ4, XOR_ZSTD
from trainer_service.encoding_costs import Speeds, cheapest_encoding, estimated_bytes

MiB = 1 << 20


def test_the_calibration_measures_how_small_each_xor_encoding_makes_a_change() -> None:
    # Left at 1.0 until an XOR encoding was chosen for real, lz4's bytes (about 2.5 per changed
    # byte) were underestimated, and it was chosen for bytes it does not make.
    speeds = Speeds.calibrated()
    assert set(speeds.xor_ratio) == {XOR_LZ4, XOR_ZSTD}
    assert speeds.xor_ratio[XOR_LZ4] > 1.5
    assert all(speed > 0 for speed in [*speeds.encode.values(), *speeds.decode.values()])


def test_real_encodes_slow_every_encoding_alike_so_the_choice_does_not_flip() -> None:
    speeds = Speeds(
        encode={SPARSE: 4e9, XOR_LZ4: 2e9, XOR_ZSTD: 1e9},
        decode={SPARSE: 8e9, XOR_LZ4: 3e9, XOR_ZSTD: 1.5e9},
        xor_ratio={XOR_LZ4: 2.5, XOR_ZSTD: 1.1},
    )
    nbytes, link = 8 * MiB, 125e6
    estimates = estimated_bytes(nbytes, 0.02, 2, speeds)
    assert cheapest_encoding(nbytes, estimates, speeds, link) == SPARSE
    for _ in range(30):  # sparse, chosen, runs at a quarter of its calibrated speed for real
        speeds.encoded(SPARSE, nbytes, nbytes / 1e9)
    assert speeds.encode_speed(SPARSE) == pytest.approx(1e9, rel=0.01)
    assert speeds.encode_speed(XOR_LZ4) == pytest.approx(0.5e9, rel=0.01)
    assert speeds.decode_speed(XOR_LZ4) == pytest.approx(0.75e9, rel=0.01)
    # lz4 at its calibrated speeds would now look cheaper than sparse at its real one
    assert cheapest_encoding(nbytes, estimates, speeds, link) == SPARSE
