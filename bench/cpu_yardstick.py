"""A yardstick for bench/serve.py's swap figure: CPU time alone, spent as cheaply as this host
allows.

At the start of each second this process copies memory (8 MiB at a time, through a 100 MB
buffer, as a push streams through memory) until it has used `--ms-per-s` milliseconds of CPU,
then sleeps out the second. It runs at the lowest CPU priority there is (SCHED_IDLE where the
platform has it, else nice 19), so the scheduler gives it only time the serving threads leave.
What serving p99 loses to it is what spending that much CPU per second on this host costs,
whatever does the spending.

    python -m bench.cpu_yardstick --ms-per-s 130
"""

from __future__ import annotations

import argparse
import ctypes
import os
import time

BUFFER = 100 << 20
BLOCK = 8 << 20


def lowest_priority() -> None:
    if hasattr(os, "SCHED_IDLE"):
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
            return
        except OSError:
            pass
    os.nice(19)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ms-per-s", type=float, required=True)
    args = parser.parse_args()
    lowest_priority()
    source = (ctypes.c_char * BUFFER)()
    target = (ctypes.c_char * BUFFER)()
    offset = 0
    while True:
        second = time.monotonic()
        spent = time.process_time()
        while time.process_time() - spent < args.ms_per_s / 1e3:
            ctypes.memmove(ctypes.byref(target, offset), ctypes.byref(source, offset), BLOCK)
            offset = (offset + BLOCK) % (BUFFER - BLOCK)
        rest = 1.0 - (time.monotonic() - second)
        if rest > 0:
            time.sleep(rest)


if __name__ == "__main__":
    main()
