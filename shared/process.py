"""What each service's main() does first, before it runs (logging, then the process-wide
knobs), and how its process ends once main() has returned."""

from __future__ import annotations

import faulthandler
import logging
import os
import signal
import sys
import threading
from typing import NoReturn

from shared.allocator import tune_for_streaming
from shared.cli import configure_logging
from shared.grpc.prefetch import read_ahead
from shared.settings import ProcessSettings

logger = logging.getLogger(__name__)

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


def watch_stop_signals(stop: threading.Event, then: str, skipped: str) -> None:
    """SIGTERM and SIGINT, acted on by a thread of their own: the first sets `stop`, logging
    `then` (what the process does now) and that another signal ends it at once, without
    `skipped`; a second ends the process at once, with status 128 + its number.

    Python runs a signal's handler on the main thread only, between bytecodes, and the kernel
    hands a signal sent to the process to any of its threads: a main thread waiting in a lock
    (Event.wait) or a long C call (a collective of ranks) never ran it when one of gRPC's threads
    took the signal. The C-level handler still writes each signal's number to the wakeup file,
    which this thread reads."""
    read, write = os.pipe()
    os.set_blocking(write, False)
    signal.set_wakeup_fd(write, warn_on_full_buffer=False)
    for number in STOP_SIGNALS:
        signal.signal(number, lambda *_: None)  # the thread acts on it

    def watch() -> None:
        seen = 0
        while True:
            for number in os.read(read, 64):
                if number not in STOP_SIGNALS:
                    continue
                name = signal.Signals(number).name
                seen += 1
                if seen == 1:
                    stop.set()
                    logger.warning(
                        "%s: %s (another %s stops at once, without %s)", name, then, name, skipped
                    )
                    continue
                logger.warning("%s again: exiting now, without %s", name, skipped)
                logging.shutdown()
                os._exit(128 + number)

    threading.Thread(target=watch, name="signals", daemon=True).start()


STOP_SIGNALS = frozenset({int(signal.SIGTERM), int(signal.SIGINT)})
