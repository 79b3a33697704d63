"""The checkpoint swap, cut short by a crash after each of its steps, once or twice in a row:
a complete checkpoint, the newest one written, is always there to load."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path

import pytest

from shared.errors import ConfigurationError, StateWriteError
from trainer_service.checkpoint import CURRENT, MANIFEST, NEXT, OLD, Checkpoints

STEPS = ("recovered", "written", "set aside", "swapped", "cleaned")


def filler(label: str) -> Callable[[Path], None]:
    """Writes a checkpoint of several files, as the trainer does (models/, trainers/)."""

    def fill(directory: Path) -> None:
        (directory / "models").mkdir()
        (directory / "models" / "m.safetensors").write_text(f"weights {label}")
        (directory / "trainers" / "t").mkdir(parents=True)
        (directory / "trainers" / "t" / "adam.optim.safetensors").write_text(f"optimizer {label}")

    return fill


def load(state_dir: Path) -> str | None:
    """What a starting trainer resumes from: the label of the checkpoint it finds (None: none),
    after checking that the checkpoint is whole and of one write."""
    found = Checkpoints(state_dir).current()
    if found is None:
        return None
    weights = (found / "models" / "m.safetensors").read_text().removeprefix("weights ")
    optimizer = (found / "trainers" / "t" / "adam.optim.safetensors").read_text()
    assert optimizer == f"optimizer {weights}", "a mix of two checkpoints"
    return weights


def crash_after(checkpoints: Checkpoints, label: str, step: str) -> None:
    """Write checkpoint `label`, dying right after `step` (nothing of the write runs after)."""
    steps = checkpoints.steps(filler(label))
    for done in steps:
        if done == step:
            steps.close()
            return
    raise AssertionError(f"no step {step!r}")


def newest(before: str | None, label: str, step: str) -> str | None:
    """The checkpoint a crash after `step` of writing `label` must leave loadable: the new one
    once it is complete, else the one before it."""
    return label if STEPS.index(step) >= STEPS.index("written") else before


@pytest.mark.parametrize("step", STEPS)
def test_a_crash_after_any_step_leaves_the_newest_complete_checkpoint(
    tmp_path: Path, step: str
) -> None:
    checkpoints = Checkpoints(tmp_path)
    checkpoints.write(filler("A"))
    crash_after(checkpoints, "B", step)
    assert load(tmp_path) == newest("A", "B", step)
    # The next write, in a restarted trainer, completes and leaves nothing else behind.
    Checkpoints(tmp_path).write(filler("C"))
    assert load(tmp_path) == "C"
    assert sorted(p.name for p in tmp_path.iterdir()) == [CURRENT]


@pytest.mark.parametrize(("first", "second"), list(itertools.product(STEPS, STEPS)))
def test_two_crashes_in_a_row_never_lose_every_checkpoint(
    tmp_path: Path, first: str, second: str
) -> None:
    checkpoints = Checkpoints(tmp_path)
    checkpoints.write(filler("A"))
    crash_after(checkpoints, "B", first)
    after_first = newest("A", "B", first)
    assert load(tmp_path) == after_first
    crash_after(Checkpoints(tmp_path), "C", second)  # the restarted trainer crashes too
    assert load(tmp_path) == newest(after_first, "C", second)


def test_the_first_checkpoint_cut_short_leaves_none_and_the_next_write_succeeds(
    tmp_path: Path,
) -> None:
    crash_after(Checkpoints(tmp_path), "A", "recovered")
    assert load(tmp_path) is None
    crash_after(Checkpoints(tmp_path), "A", "set aside")  # no `checkpoint` to set aside yet
    assert load(tmp_path) == "A"
    Checkpoints(tmp_path).write(filler("B"))
    assert load(tmp_path) == "B"


def test_a_write_whose_fill_fails_is_never_loaded(tmp_path: Path) -> None:
    checkpoints = Checkpoints(tmp_path)
    checkpoints.write(filler("A"))

    def half(directory: Path) -> None:
        (directory / "models").mkdir()
        (directory / "models" / "m.safetensors").write_text("weights B")
        raise OSError(28, "No space left on device")

    with pytest.raises(StateWriteError, match=r"No space left.*the last complete one"):
        checkpoints.write(half)
    assert not (tmp_path / NEXT).exists()  # what it wrote is removed (space given back)
    assert load(tmp_path) == "A"
    checkpoints.write(filler("C"))
    assert load(tmp_path) == "C"
    assert not (tmp_path / NEXT).exists() and not (tmp_path / OLD).exists()


def test_a_checkpoint_swapped_in_by_an_older_trainer_still_loads(tmp_path: Path) -> None:
    """Directories written before completion markers existed: `checkpoint` and a leftover
    `.checkpoint-old` (complete by construction) load; an unmarked `.checkpoint-next` does not."""
    for name, label in ((OLD, "A"), (NEXT, "B")):
        (tmp_path / name).mkdir()
        filler(label)(tmp_path / name)
    assert load(tmp_path) == "A"
    Checkpoints(tmp_path).write(filler("C"))
    assert load(tmp_path) == "C"


def test_a_checkpoint_damaged_on_disk_fails_verification_naming_the_file(tmp_path: Path) -> None:
    checkpoints = Checkpoints(tmp_path)
    written = checkpoints.write(filler("A"))
    checkpoints.verify(written)  # as written: whole
    weights = written / "models" / "m.safetensors"
    weights.write_text("weights B")  # same size, other bytes
    with pytest.raises(ConfigurationError, match=f"{weights} does not match its hash"):
        checkpoints.verify(written)
    weights.unlink()
    with pytest.raises(ConfigurationError, match=f"{weights} is missing or not a file"):
        checkpoints.verify(written)
    (written / MANIFEST).unlink()  # nothing vouches for the files then
    with pytest.raises(ConfigurationError, match=f"its manifest {written / MANIFEST} is missing"):
        checkpoints.verify(written)


def test_a_manifest_replaced_or_cut_down_does_not_vouch_for_what_it_leaves_out(
    tmp_path: Path,
) -> None:
    """A manifest that lists nothing (or less than the checkpoint holds) once let a checkpoint
    whose model file was then removed resume the app's initial weights."""
    checkpoints = Checkpoints(tmp_path)
    written = checkpoints.write(filler("A"))
    (written / MANIFEST).write_text("{}")
    (written / "models" / "m.safetensors").unlink()
    optimizer = written / "trainers" / "t" / "adam.optim.safetensors"
    with pytest.raises(ConfigurationError, match=f"{optimizer} is not in its manifest"):
        checkpoints.verify(written)
