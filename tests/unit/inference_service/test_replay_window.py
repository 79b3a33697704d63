"""The forward replay window: the data messages a replica passed on last, from which it resumes
a hop after a cut one at the offset that hop holds."""

from __future__ import annotations

from inference_service.syncplane.forward import ReplayWindow
from shared.weights import wire

PAYLOAD = bytes(range(256)) * 4  # 1024 bytes, passed on in messages of 100


def window(limit: int) -> ReplayWindow:
    kept = ReplayWindow(limit)
    for at in range(0, len(PAYLOAD), 100):
        piece = PAYLOAD[at : at + 100]
        kept.add(len(piece), wire.encode_data([piece]))
    return kept


def replayed(messages: list[bytes]) -> bytes:
    payloads = [wire.data_payload(m) for m in messages]
    return b"".join(bytes(p) for p in payloads if p is not None)


def test_the_messages_from_any_offset_kept_carry_exactly_the_payload_from_there() -> None:
    kept = window(1 << 20)
    for offset in (0, 1, 99, 100, 101, 555, 1000, 1023):
        messages = kept.since(offset)
        assert messages is not None
        assert replayed(messages) == PAYLOAD[offset:]
    assert kept.since(len(PAYLOAD)) == []  # the hop holds all passed on: nothing to replay


def test_only_the_window_is_kept_and_an_older_offset_is_not_replayed() -> None:
    kept = window(350)  # the last four messages: 3 x 102 bytes, and 26
    assert kept.end == len(PAYLOAD)
    assert kept.since(699) is None
    messages = kept.since(700)
    assert messages is not None and replayed(messages) == PAYLOAD[700:]
    assert kept.since(len(PAYLOAD) + 1) is None  # more than was ever passed on


def test_with_no_window_only_the_offset_passed_on_resumes() -> None:
    kept = window(0)
    assert kept.since(len(PAYLOAD)) == []
    assert kept.since(0) is None
