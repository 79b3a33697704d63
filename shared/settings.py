"""Settings declared once: flag, environment variable, default, help, converter and scope.

A service's settings are a frozen dataclass whose fields are its options, each declared as
`field(default=..., metadata=option(flag, env, help, converter))`. From that one declaration
come the argparse parser (flag > environment > default; `--help` names each option's
environment variable and default), the settings object, and docs/configuration.md
(scripts/gen_config_docs.py). Where a default belongs to a part the option configures (a limit
of the push receiver, of the batcher), the field's default is that part's own.

Nothing is read at import time: `parse` takes the environment as an argument, which `main()`
passes (os.environ). Tests build settings by constructor.

The process-wide knobs (`ProcessSettings`) are read by every process of both services from its
environment alone; `main()` resolves them and hands the values to the code they govern.

A variable under a service's own prefix (INFERENCE_, TRAINER_) that no option reads, a mistyped
name most likely, is named in a warning on stderr at start, with the closest option's variable.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import enum
import os
import sys
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from shared.cli import (
    AUTO_BOOLEAN,
    LOG_LEVEL,
    OPTIONAL_HOST_PORT,
    TEXT,
    Converter,
    choice,
)
from shared.errors import ConfigurationError

S = TypeVar("S")

_KEY = "weightsync.option"


class _Required:
    """The default of an option that has none: it must be given."""

    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()

# Where the inference service's sync plane listens by default, and so where trainers push.
SYNC_ADDRESS = "127.0.0.1:8101"


class Scope(enum.Enum):
    """Which processes read an option."""

    INFERENCE = "inference-service"
    TRAINER = "trainer-service"
    BOTH = "both services"


@dataclass(frozen=True)
class Option:
    """One option as declared: `name`, `default` and `scope` come from the field and the
    settings class that hold it (see `options`)."""

    flag: str | None  # None: the environment alone sets it
    env: str
    help: str
    convert: Converter = TEXT
    switch: bool = False  # a flag without a value; the environment variable takes true/false
    default_text: str | None = None  # the default in words, where its value says too little
    metavar: str | None = None  # what the text looks like, where the converter's word is vague
    name: str = ""
    default: Any = REQUIRED
    scope: Scope | None = None

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    @property
    def shown_default(self) -> str:
        if self.required:
            return "required"
        if self.default_text is not None:
            return self.default_text
        if self.default is None:
            return self.convert.none
        return self.convert.show(self.default)

    @property
    def looks_like(self) -> str:
        return self.metavar or self.convert.metavar

    @property
    def label(self) -> str:
        return self.env if self.flag is None else f"{self.flag} / {self.env}"


def option(
    flag: str | None,
    env: str,
    help: str,
    convert: Converter = TEXT,
    *,
    switch: bool = False,
    default_text: str | None = None,
    metavar: str | None = None,
) -> dict[str, Option]:
    """A settings field's metadata: `field(default=..., metadata=option(...))`."""
    return {_KEY: Option(flag, env, help, convert, switch, default_text, metavar)}


@dataclass(frozen=True)
class ServiceOptions:
    """Options both services declare alike, each under its own prefix (INFERENCE_, TRAINER_):
    `field = COMMON.device()` where `COMMON = ServiceOptions("INFERENCE")`."""

    prefix: str

    def models(self) -> Any:
        return field(
            metadata=option(
                "--models",
                f"{self.prefix}_MODELS",
                "import string of the app: package.module:attribute",
                metavar="MODULE:ATTR",
            )
        )

    def device(self) -> Any:
        return field(
            default="auto",
            metadata=option(
                "--device",
                f"{self.prefix}_DEVICE",
                "where every model goes: auto (CUDA when present), cpu, cuda or cuda:N (over "
                "the device a model's factory names, with a warning)",
                metavar="DEVICE",
            ),
        )

    def metrics(self, default: str) -> Any:
        return field(
            default=default,
            metadata=option(
                "--metrics-listen",
                f"{self.prefix}_METRICS_LISTEN",
                "Prometheus /metrics listen address, or 'off'",
                OPTIONAL_HOST_PORT,
            ),
        )

    def log_level(self) -> Any:
        return field(
            default="INFO",
            metadata=option("--log-level", f"{self.prefix}_LOG_LEVEL", "logging level", LOG_LEVEL),
        )


def options(cls: type, scope: Scope) -> list[Option]:
    """The options a settings dataclass declares, in field order."""
    found = []
    for spec in dataclasses.fields(cls):
        declared = spec.metadata.get(_KEY)
        if not isinstance(declared, Option):
            raise TypeError(f"{cls.__name__}.{spec.name} is not declared with option()")
        default: Any = REQUIRED if spec.default is dataclasses.MISSING else spec.default
        if spec.default_factory is not dataclasses.MISSING:
            default = spec.default_factory()
        found.append(dataclasses.replace(declared, name=spec.name, default=default, scope=scope))
    return found


def _help(text: str) -> str:
    return text.replace("%", "%%")  # argparse formats help with %


def parser_for(
    prog: str, description: str, declared: Sequence[Option], notes: Sequence[Option] = ()
) -> argparse.ArgumentParser:
    """The argparse parser of `declared` options; `notes` (environment-only options) are
    listed after them."""
    epilog = None
    if notes:
        lines = ["process-wide environment variables (both services):"]
        for note in notes:
            text = f"{note.help} (default: {note.shown_default})"
            lines.append(f"  {note.env}")
            lines.extend(textwrap.wrap(text, 76, initial_indent="    ", subsequent_indent="    "))
        epilog = "\n".join(lines)
    parser = argparse.ArgumentParser(
        prog=prog,
        description=textwrap.fill(description, 79),
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    for declared_option in declared:
        if declared_option.flag is None:
            continue
        where = f"env {declared_option.env}"
        if declared_option.switch:
            parser.add_argument(
                declared_option.flag,
                dest=declared_option.name,
                action="store_const",
                const="true",
                default=None,
                help=_help(f"{declared_option.help} ({where}; true or false; default: false)"),
            )
            continue
        shown = declared_option.shown_default
        parser.add_argument(
            declared_option.flag,
            dest=declared_option.name,
            default=None,
            metavar=declared_option.looks_like,
            help=_help(
                f"{declared_option.help} ({where}; "
                + ("required)" if shown == "required" else f"default: {shown})")
            ),
        )
    return parser


def parse(
    cls: type[S],
    declared: Sequence[Option],
    prog: str,
    description: str,
    argv: Sequence[str] | None,
    environ: Mapping[str, str],
    notes: Sequence[Option] = (),
) -> S:
    """`cls` built from `argv` and `environ`: each option from its flag, else its environment
    variable (an empty one counts as unset), else the field's default. A bad or missing value
    exits with status 2 and a message naming the flag and the environment variable."""
    parser = parser_for(prog, description, declared, notes)
    given = vars(parser.parse_args(argv))
    values: dict[str, Any] = {}
    for declared_option in declared:
        raw, source = given.get(declared_option.name), declared_option.flag
        if raw is None:
            raw, source = environ.get(declared_option.env) or None, declared_option.env
        if raw is None:
            if declared_option.required:
                parser.error(f"{declared_option.label} is required")
            continue
        try:
            values[declared_option.name] = declared_option.convert.parse(raw)
        except (ValueError, ConfigurationError) as exc:
            where = "" if declared_option.flag is None else f" (from {source})"
            parser.error(f"{declared_option.label}: {exc}{where}")
    return cls(**values)


def parse_service(
    cls: type[S],
    declared: Sequence[Option],
    prog: str,
    description: str,
    argv: Sequence[str] | None,
    environ: Mapping[str, str] | None,
) -> S:
    """A service's settings: flags over `environ` (os.environ by default) over the declared
    defaults; its --help lists the process-wide environment variables too."""
    environ = os.environ if environ is None else environ
    settings = parse(cls, declared, prog, description, argv, environ, PROCESS_OPTIONS)
    for warning in unread_variables(declared, environ):
        sys.stderr.write(f"{prog}: warning: {warning}\n")
    return settings


def unread_variables(declared: Sequence[Option], environ: Mapping[str, str]) -> list[str]:
    """A line for each variable set under the prefix of `declared`'s variables that none of
    them is: a mistyped name, most likely, which would otherwise be silently ignored."""
    known = [o.env for o in declared]
    prefixes = tuple({env.split("_", 1)[0] + "_" for env in known})
    lines = []
    for name in sorted(environ):
        if name.startswith(prefixes) and name not in known and environ[name]:
            close = difflib.get_close_matches(name, known, n=1, cutoff=0.8)
            hint = f"; did you mean {close[0]}?" if close else ""
            lines.append(f"{name} is set, but no option reads it, so it has no effect{hint}")
    return lines


@dataclass(frozen=True)
class ProcessSettings:
    """Knobs of the whole process, read from the environment by every process of both services
    (the sync relay included); `main()` resolves them and hands them down."""

    prefetch: bool | None = field(
        default=None,
        metadata=option(
            None,
            "WEIGHTSYNC_PREFETCH",
            "trainer-service: read each outgoing push ahead on a thread of its own: 1 always, "
            "0 never, auto where the process may use 4 or more CPUs (the inference service "
            "always reads incoming pushes on a thread, to end silent ones; "
            "shared/grpc/prefetch.py)",
            AUTO_BOOLEAN,
        ),
    )
    malloc: str = field(
        default="tuned",
        metadata=option(
            None,
            "WEIGHTSYNC_MALLOC",
            "glibc malloc thresholds: tuned for streamed messages, or default to keep glibc's "
            "own (MALLOC_*_ variables, glibc.malloc tunables and a preloaded allocator are "
            "always left alone; shared/allocator.py)",
            choice("tuned", "default"),
        ),
    )

    @classmethod
    def from_environ(cls, environ: Mapping[str, str], prog: str) -> ProcessSettings:
        return parse(cls, PROCESS_OPTIONS, prog, "", [], environ)


PROCESS_OPTIONS = options(ProcessSettings, Scope.BOTH)
