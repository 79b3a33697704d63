"""Command-line flags that can also be set by environment variables (flag > env > default).

Each service declares its flags once as `Option`s; `parse` builds the argparse parser (whose
--help names each flag's environment variable and default) and returns plain values. Nothing is
read from the environment at import time: `parse` takes the environment as an argument.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from shared.errors import ConfigurationError


@dataclass(frozen=True)
class Option:
    flag: str
    env: str
    help: str
    default: Any = None
    convert: Callable[[str], Any] = str
    required: bool = False
    choices: Sequence[str] | None = None
    switch: bool = False  # a flag without a value; the env var takes true/false

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")


def parse(
    prog: str,
    description: str,
    options: Sequence[Option],
    argv: Sequence[str] | None,
    environ: Mapping[str, str],
) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    for option in options:
        shown = "required" if option.required else f"default: {option.default}"
        if option.switch:
            parser.add_argument(
                option.flag,
                dest=option.dest,
                action="store_const",
                const="true",
                default=None,
                help=f"{option.help} (env {option.env}; true or false; default: false)",
            )
            continue
        parser.add_argument(
            option.flag,
            dest=option.dest,
            default=None,
            help=f"{option.help} (env {option.env}; {shown})",
        )
    args = vars(parser.parse_args(argv))
    values: dict[str, Any] = {}
    for option in options:
        raw = args[option.dest]
        if raw is None:
            raw = environ.get(option.env) or None
        if raw is None:
            if option.required:
                parser.error(f"{option.flag} (or {option.env}) is required")
            values[option.dest] = option.default
            continue
        try:
            value = option.convert(raw)
        except (ValueError, ConfigurationError) as exc:
            parser.error(f"{option.flag} / {option.env}: {exc}")
        if option.choices is not None and value not in option.choices:
            parser.error(
                f"{option.flag} / {option.env} {raw!r}: choose from {', '.join(option.choices)}"
            )
        values[option.dest] = value
    return values


def boolean(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"{value!r} is not true or false")


def host_port(value: str) -> str:
    """Check a HOST:PORT listen or target address."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{value!r} is not HOST:PORT")
    return value


def optional_host_port(value: str) -> str | None:
    """HOST:PORT, or 'off' (None) to disable what listens there."""
    return None if value.lower() in ("off", "none", "") else host_port(value)


def address_list(value: str) -> tuple[str, ...]:
    items = tuple(host_port(v.strip()) for v in value.split(",") if v.strip())
    if not items:
        raise ValueError("expected one or more HOST:PORT, comma-separated")
    return items


def name_list(value: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip())


def name_groups(value: str) -> tuple[tuple[str, ...], ...]:
    """`a,b;c` -> (("a", "b"), ("c",)): groups separated by ';', names in a group by ','."""
    groups = tuple(name_list(group) for group in value.split(";"))
    return tuple(group for group in groups if group)


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def is_loopback(address: str) -> bool:
    host = address.rpartition(":")[0].strip("[]")
    return host in ("localhost", "::1") or host.startswith("127.")
