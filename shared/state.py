"""State persistence: objects that can save to and load from a path."""

from __future__ import annotations

from pathlib import Path


class PersistentStateMixin:
    """`save_state(path)` / `load_state(path)`, no-ops unless overridden (as in PAMIQ)."""

    def save_state(self, path: Path) -> None:
        """Save this object's state under `path`."""

    def load_state(self, path: Path) -> None:
        """Load this object's state from `path`."""
