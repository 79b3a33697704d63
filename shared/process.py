"""What each service's main() does first, before it runs: logging, then the process-wide knobs."""

from __future__ import annotations

import os

from shared.allocator import tune_for_streaming
from shared.cli import configure_logging
from shared.grpc.prefetch import read_ahead
from shared.settings import ProcessSettings


def prepare_process(prog: str, log_level: str) -> None:
    """Logging at `log_level`, and the process's `ProcessSettings` (read from os.environ; a bad
    value exits with status 2, naming `prog`) handed to the code they govern."""
    process = ProcessSettings.from_environ(os.environ, prog)
    configure_logging(log_level)
    tune_for_streaming(process.malloc)
    read_ahead(process.prefetch)
