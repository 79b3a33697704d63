"""State persistence: objects that save to and load from a path, as PAMIQ-Core's mixin."""

from __future__ import annotations

from pathlib import Path


class PersistentStateMixin:
    """Gives an object `save_state(path)` / `load_state(path)`, no-ops unless overridden.

    `path` is a location without a suffix: an implementation may create a directory there, or
    files named after it (`f"{path}.safetensors"`), as long as `load_state` finds what
    `save_state` wrote.
    """

    def save_state(self, path: Path) -> None:
        """Save this object's state.

        Args:
            path: Where to save; the parent directory exists.
        """

    def load_state(self, path: Path) -> None:
        """Load the state that `save_state(path)` saved.

        Args:
            path: The path given to `save_state`.
        """
