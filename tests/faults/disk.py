"""The state disk a fault schedule's service writes to: a small tmpfs (when it can mount one),
filled to the last byte and freed again by the full-disk steps."""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

TMPFS_BYTES = 24 << 20  # a few versions of the 1 MiB model, and little more


class StateDisk:
    """A tmpfs of TMPFS_BYTES on `path` once `mount()` succeeds (it needs root)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.filler = path / "faults-filler"
        self.mounted = False
        self.mount_error = ""

    def mount(self) -> bool:
        """Create `path` and mount the tmpfs on it; False (and `mount_error`) if not possible."""
        self.path.mkdir(parents=True)
        if os.geteuid() != 0:
            self.mount_error = "not running as root"
            return False
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={TMPFS_BYTES}", "tmpfs", str(self.path)],
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            self.mount_error = (done.stderr or done.stdout).strip() or f"exit {done.returncode}"
            return False
        self.mounted = True
        return True

    def fill(self) -> int:
        """Write a filler file until the disk is full; return the bytes written."""
        written = 0
        handle = os.open(self.filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            for size in (1 << 20, 4096, 1):
                block = b"\0" * size
                while True:
                    try:
                        count = os.write(handle, block)
                    except OSError as exc:
                        if exc.errno != errno.ENOSPC:
                            raise
                        break
                    written += count
                    if count < size:
                        break
        finally:
            os.close(handle)
        return written

    def free(self) -> None:
        self.filler.unlink(missing_ok=True)

    def unmount(self) -> list[str]:
        """Unmount the tmpfs (lazily if it is busy); what could not be done."""
        if not self.mounted:
            return []
        self.mounted = False
        done = subprocess.run(["umount", str(self.path)], capture_output=True, text=True)
        if done.returncode == 0:
            return []
        lazy = subprocess.run(["umount", "-l", str(self.path)], capture_output=True, text=True)
        if lazy.returncode != 0:
            return [f"could not unmount {self.path}: {lazy.stderr.strip()}"]
        return []
