"""Text given on the command line or in the environment, turned into values; logging set-up.

Each parse function takes the text of one option and returns its value, or raises ValueError
with a message that says what was expected (shared/settings.py prefixes it with the option's
flag and environment variable). A `Converter` pairs one with what its text looks like and how
a value is written back.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from shared import protocol
from shared.errors import ConfigurationError
from shared.grpc.address import checked_address
from shared.grpc.auth import checked_token

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off", "")

# Units a duration may carry, in seconds; a bare number is in the option's own unit.
DURATION_UNITS = {"ms": 1e-3, "s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}
# The longest duration taken: beyond it timers overflow (a gRPC deadline, a thread's wait,
# time_t) and turn into a traceback, or a deadline already past.
MAX_SECONDS = 365 * 86400.0
# Units a size may carry, in bytes, in any case; a bare number is bytes.
SIZE_UNITS = {
    "B": 1,
    "KiB": 1 << 10,
    "MiB": 1 << 20,
    "GiB": 1 << 30,
    "TiB": 1 << 40,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
}
_SIZE_SCALES = {name.lower(): scale for name, scale in SIZE_UNITS.items()}
_BINARY = (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10))


def boolean(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ValueError(f"{value!r} is not true or false")


def auto_boolean(value: str) -> bool | None:
    """true, false, or auto (None): the program decides."""
    if value.strip().lower() == "auto":
        return None
    try:
        return boolean(value)
    except ValueError:
        raise ValueError(f"{value!r} is not auto, true (1) or false (0)") from None


def whole_number(value: str, minimum: int | None = None, maximum: int | None = None) -> int:
    try:
        number = int(value.strip())
    except ValueError:
        raise ValueError(f"{value!r} is not a whole number") from None
    if minimum is not None and number < minimum:
        raise ValueError(f"{number} is less than {minimum}")
    if maximum is not None and number > maximum:
        raise ValueError(f"{number} is more than {maximum}")
    return number


def real_number(value: str, minimum: float = 0.0, positive: bool = False) -> float:
    """A finite number of at least `minimum` (above it, when `positive`)."""
    try:
        number = float(value.strip())
    except ValueError:
        raise ValueError(f"{value!r} is not a number") from None
    if not math.isfinite(number):
        raise ValueError(f"{value!r} is not a finite number")
    if number < minimum or (positive and number == minimum):
        raise ValueError(f"{value!r} must be {'more than' if positive else 'at least'} {minimum:g}")
    return number


def _split_unit(value: str) -> tuple[str, str]:
    text = value.strip()
    number = text.rstrip("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
    return number.strip(), text[len(number) :].lower()


def seconds(value: str, unit: str = "s", positive: bool = False) -> float:
    """Seconds, from a number in `unit` or one with a unit of its own: 500ms, 10s, 2m, 1h."""
    number, given = _split_unit(value)
    scale = DURATION_UNITS.get(given or unit)
    if scale is None:
        raise ValueError(f"{value!r}: unknown unit {given!r} (use ms, s, m or h)")
    try:
        seconds = real_number(number, positive=positive) * scale
    except ValueError:
        raise ValueError(
            f"{value!r} is not a {'positive' if positive else 'non-negative'} duration "
            f"(a number of {unit}, or one with a unit: 500ms, 10s, 2m, 1h)"
        ) from None
    if seconds > MAX_SECONDS:
        raise ValueError(f"{value!r} is more than a year")
    return seconds


def show_duration(value: float, unit: str = "s") -> str:
    return f"{round(value / DURATION_UNITS[unit], 9):g}{unit}"


def nbytes(value: str, minimum: int = 1) -> int:
    """Bytes, from a whole number of bytes or a size with a unit: 16MiB, 1GB, 64GiB."""
    number, given = _split_unit(value)
    scale = _SIZE_SCALES.get(given or "b")
    if scale is None:
        raise ValueError(
            f"{value!r}: unknown unit {given!r} (use B, KiB, MiB, GiB, TiB, KB, MB...)"
        )
    try:
        exact = Decimal(number) * scale
    except InvalidOperation:
        raise ValueError(f"{value!r} is not a size (bytes, or 16MiB, 1GB, 64GiB...)") from None
    if not exact.is_finite() or exact != exact.to_integral_value():
        raise ValueError(f"{value!r} is not a whole number of bytes")
    if exact < minimum:
        raise ValueError(f"{value!r} is less than {minimum} byte(s)")
    return int(exact)


def show_size(value: int) -> str:
    for name, scale in _BINARY:
        if value and value % scale == 0:
            return f"{value // scale}{name}"
    return str(value)


def path(value: str) -> Path:
    if not value.strip():
        raise ValueError("expected a path, got nothing")
    return Path(value)


def host_port(value: str) -> str:
    """Check a HOST:PORT listen or target address ([V6]:PORT for IPv6)."""
    host, sep, port = value.rpartition(":")
    if "/" in value or "@" in value:
        raise ValueError(f"{value!r}: an address is HOST:PORT, with no scheme (http://) or path")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{value!r} is not HOST:PORT")
    if ":" in host and not (host.startswith("[") and host.endswith("]")):
        raise ValueError(f"{value!r}: write an IPv6 address in brackets, as [{host}]:{port}")
    return value


def optional_host_port(value: str) -> str | None:
    """HOST:PORT, or 'off' (None) to disable what listens there."""
    return None if value.lower() in ("off", "none", "") else host_port(value)


def address_list(value: str) -> tuple[str, ...]:
    """Addresses to dial, comma-separated: each checked as shared/grpc/address.py does."""
    items = tuple(checked_address(v.strip(), "an address") for v in value.split(",") if v.strip())
    if not items:
        raise ValueError("expected one or more HOST:PORT, comma-separated")
    return items


def name_list(value: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip())


def name_groups(value: str) -> tuple[tuple[str, ...], ...]:
    """`a,b;c` -> (("a", "b"), ("c",)): groups separated by ';', names in a group by ','."""
    groups = tuple(name_list(group) for group in value.split(";"))
    named = tuple(group for group in groups if group)
    if not named:
        raise ValueError(f"{value!r} names no trainer: give groups as 'a,b;c'")
    return named


def bearer_token(value: str) -> str:
    """A token as a gRPC header carries it; '' (none) as it is."""
    try:
        return checked_token(value) if value else value
    except ConfigurationError as exc:
        raise ValueError(str(exc)) from None


def writer_id(value: str) -> str:
    """A trainer's id, as replicas take it (shared.protocol.MAX_WRITER_ID_BYTES at most)."""
    problem = protocol.writer_id_problem(value)
    if problem is not None:
        raise ValueError(problem)
    return value


# Converters: each option's parse function with what its text looks like (--help's metavar)
# and how its values are written back (the defaults in --help and docs/configuration.md).


def _plain(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, tuple):
        return ",".join(_plain(item) for item in value)
    return str(value)


@dataclass(frozen=True)
class Converter:
    """An option's text (its flag's or its environment variable's) to its value, and a value
    back to text (for --help and the docs); `metavar` says what the text looks like."""

    parse: Callable[[str], Any]
    metavar: str
    show: Callable[[Any], str] = _plain
    none: str = "none"  # what None, where the converter returns it, means


def integer(minimum: int | None = None, maximum: int | None = None) -> Converter:
    return Converter(lambda text: whole_number(text, minimum, maximum), "N")


def duration(unit: str = "s", positive: bool = False) -> Converter:
    """Seconds; a bare number is in `unit` (the flag's name says which), or it carries its own."""
    return Converter(
        lambda text: seconds(text, unit, positive),
        "DURATION",
        lambda value: show_duration(value, unit),
    )


def scaled(unit: str, scale: float) -> Converter:
    """A non-negative number in `unit`, held as that number times `scale` (MB/s as bytes/s)."""
    return Converter(
        lambda text: real_number(text) * scale, unit, lambda value: f"{value / scale:g}"
    )


def choice(*values: str, fold: Callable[[str], str] = str.lower) -> Converter:
    def parse(text: str) -> str:
        folded = fold(text.strip())
        if folded not in values:
            raise ValueError(f"{text!r} is not one of {', '.join(values)}")
        return folded

    return Converter(parse, "{" + ",".join(values) + "}")


TEXT = Converter(str, "TEXT")
TOKEN = Converter(bearer_token, "TOKEN")
WRITER_ID = Converter(writer_id, "ID")
PATH = Converter(path, "PATH")
BOOLEAN = Converter(boolean, "BOOL")
AUTO_BOOLEAN = Converter(auto_boolean, "{auto,1,0}", none="auto")
SIZE = Converter(nbytes, "SIZE", show_size)
HOST_PORT = Converter(host_port, "HOST:PORT")
OPTIONAL_HOST_PORT = Converter(optional_host_port, "HOST:PORT|off", none="off")
ADDRESSES = Converter(address_list, "HOST:PORT[,...]")
NAMES = Converter(name_list, "NAME[,...]")
NAME_GROUPS = Converter(
    name_groups, "A,B;C", lambda groups: ";".join(",".join(group) for group in groups)
)
LOG_LEVEL = choice(*LOG_LEVELS, fold=str.upper)


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def is_loopback(address: str) -> bool:
    host = address.rpartition(":")[0].strip("[]")
    return host in ("localhost", "::1") or host.startswith("127.")
