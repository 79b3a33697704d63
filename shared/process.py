"""What each service's main() does first, before it runs (logging, then the process-wide
knobs), and how its process ends once main() has returned."""

from __future__ import annotations

import faulthandler
import os
import sys
from typing import NoReturn

from shared.allocator import tune_for_streaming
from shared.cli import configure_logging
from shared.grpc.prefetch import read_ahead
from shared.settings import ProcessSettings

# How long a process may take to end once its main() has returned: its servers have stopped by
# then, and what is left (threads joined at exit, atexit work) takes well under a second.
EXIT_BOUND_S = 10.0


def prepare_process(prog: str, log_level: str) -> None:
    """Logging at `log_level`, and the process's `ProcessSettings` (read from os.environ; a bad
    value exits with status 2, naming `prog`) handed to the code they govern."""
    process = ProcessSettings.from_environ(os.environ, prog)
    configure_logging(log_level)
    tune_for_streaming(process.malloc)
    read_ahead(process.prefetch)


def end_process(code: int, bound_s: float = EXIT_BOUND_S) -> NoReturn:
    """Exit with status `code`, within `bound_s` seconds whatever is left running: a thread
    still at work when the interpreter joins it (a gRPC handler stuck past the drain, say)
    would otherwise keep a stopped service's process alive for good. Past the bound, every
    thread's stack goes to stderr, naming what held the process, and the status is 1."""
    faulthandler.dump_traceback_later(bound_s, exit=True)
    sys.exit(code)
