"""The sequence numbers a trainer remembers per sender (trainer_service/experience/service.py):
a number is taken for a resend only when that sender had it stored."""

from __future__ import annotations

from trainer_service.experience.service import MAX_GAPS, Sequences


def test_numbers_skipped_or_below_the_first_are_not_taken_for_resends() -> None:
    stored = Sequences()
    assert 1 not in stored
    for sequence in (5, 6, 9):
        stored.add(sequence)
    assert [n for n in range(12) if n in stored] == [5, 6, 9]
    for sequence in (7, 2, 8):
        stored.add(sequence)
    assert [n for n in range(12) if n in stored] == [2, 5, 6, 7, 8, 9]


def test_beyond_max_gaps_the_lowest_run_skipped_is_forgotten() -> None:
    stored = Sequences()
    stored.add(1)
    for run in range(MAX_GAPS + 1):  # 3, 5, 7, ...: a run of one skipped before each
        stored.add(3 + 2 * run)
    skipped = [n for n in range(3 + 2 * MAX_GAPS) if n not in stored]
    assert skipped == [4 + 2 * run for run in range(MAX_GAPS)]  # 0 and 2 forgotten
