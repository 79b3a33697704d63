"""docs/code-map.md answers "where is X" by file names: every path it names must exist."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MAP = ROOT / "docs" / "code-map.md"


def named_paths() -> list[str]:
    """The repository paths in backticks: a name with a slash or a .py/.md file."""
    quoted = re.findall(r"`([^`\s]+)`", MAP.read_text())
    return [q for q in quoted if "/" in q and not q.startswith("-")]


def test_the_code_map_names_only_paths_that_exist() -> None:
    paths = named_paths()
    assert len(paths) > 40, paths  # the map was read, not skipped
    missing = [p for p in paths if not (ROOT / p).exists()]
    assert missing == [], f"docs/code-map.md names paths that do not exist: {missing}"
