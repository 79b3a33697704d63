"""Run a compose file's services as local processes, the way `docker compose up` would run them.

These machines have no Docker engine. This harness reads the compose files a user would pass
(PyYAML, merge keys included), interpolates `${VAR}`, `${VAR:-default}` and `${VAR:?message}` as
compose does, and starts every replica of every service as a process running exactly the
declared command with exactly the declared environment. What a container would provide is
emulated, and only that:

- each replica gets an address of its own on the loopback network (127.N.S.R); its `0.0.0.0`
  listens and its health check's `127.0.0.1` land there, on the ports the file declares;
- a service name resolves to the addresses of all of its replicas, as compose's DNS does,
  through a `sitecustomize` hook that wraps `socket.getaddrinfo` in the started processes;
- each named volume is a directory, shared by every replica that mounts it; container paths
  in the environment are mapped onto it;
- `depends_on: condition: service_healthy` runs the declared health check command until it
  passes, within its interval times retries; stopping sends SIGTERM and waits
  `stop_grace_period`, then SIGKILL, as `docker compose stop` does.
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from devtools import launch

ROOT = launch.ROOT
BIN = Path(sys.executable).parent
VARIABLE = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")

DNS_HOOK = '''"""Compose's DNS for the harness: service names resolve to replica addresses."""
import json, os, socket

_real = socket.getaddrinfo


def _getaddrinfo(host, port, *args, **kwargs):
    if isinstance(host, str):
        with open(os.environ["COMPOSE_DNS_FILE"]) as table:
            addresses = json.load(table).get(host)
        if addresses is not None:
            found = [r for a in addresses for r in _real(a, port, *args, **kwargs)]
            if not found:
                raise socket.gaierror(socket.EAI_NONAME, f"{host}: no replica is running")
            return found
    return _real(host, port, *args, **kwargs)


socket.getaddrinfo = _getaddrinfo
'''


class ComposeError(AssertionError):
    """The compose file cannot be run as written, or a service did not come up."""


def interpolate(value: Any, env: Mapping[str, str]) -> Any:
    """Substitute variables in every string of a loaded compose document."""
    if isinstance(value, dict):
        return {key: interpolate(item, env) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item, env) for item in value]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, operator, argument = match.groups()
        current = env.get(name)
        unset = current is None or (current == "" and operator is not None and ":" in operator)
        if operator is not None and operator.endswith("-") and unset:
            return argument
        if operator is not None and operator.endswith("?") and unset:
            raise ComposeError(f"required variable {name} is missing: {argument}")
        return current or ""

    return VARIABLE.sub(substitute, value)


def merge(base: Any, overlay: Any) -> Any:
    """Compose's merge of several -f files: mappings merge key by key, the rest is replaced."""
    if isinstance(base, dict) and isinstance(overlay, dict):
        merged = dict(base)
        for key, item in overlay.items():
            merged[key] = merge(base[key], item) if key in base else item
        return merged
    return overlay


def load(files: Sequence[Path], env: Mapping[str, str]) -> dict[str, Any]:
    document: dict[str, Any] = {}
    for path in files:
        document = merge(document, interpolate(yaml.safe_load(path.read_text()), env))
    return document


def seconds(duration: str | int | float) -> float:
    """Compose durations: 30s, 1m30s, 500ms, or a bare number of seconds."""
    if isinstance(duration, int | float):
        return float(duration)
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", duration)
    if not parts or "".join(n + u for n, u in parts) != duration:
        raise ComposeError(f"cannot read duration {duration!r}")
    return sum(float(number) * units[unit] for number, unit in parts)


@dataclass
class Replica:
    service: str
    index: int
    address: str  # the container's own IP
    process: subprocess.Popen[bytes]
    log: Path

    @property
    def name(self) -> str:
        return f"{self.service}-{self.index}"

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def failed(self, problem: str) -> ComposeError:
        return ComposeError(f"{self.name} {problem}; the end of its log:\n{launch.tail(self.log)}")


@dataclass
class Project:
    """The services of one compose project, run as local processes."""

    tmp: Path
    files: Sequence[Path]
    env: Mapping[str, str]
    document: dict[str, Any] = field(init=False)
    replicas: dict[str, list[Replica]] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self.document = load(self.files, self.env)
        # Replicas live on 127.<subnet>.S.R; a random subnet keeps two runs on one machine apart.
        self.subnet = random.randint(64, 250)
        self.dns_dir = self.tmp / "compose-dns"
        self.dns_dir.mkdir(parents=True, exist_ok=True)
        (self.dns_dir / "sitecustomize.py").write_text(DNS_HOOK)
        self._write_dns()

    @property
    def services(self) -> dict[str, dict[str, Any]]:
        """The services that run: those of no profile, and those of a profile in
        COMPOSE_PROFILES (as compose's --profile)."""
        wanted = set(self.env.get("COMPOSE_PROFILES", "").split(","))
        services: dict[str, dict[str, Any]] = self.document["services"]
        return {
            name: spec
            for name, spec in services.items()
            if not spec.get("profiles") or wanted & set(spec["profiles"])
        }

    def up(self, scale: Mapping[str, int] | None = None) -> None:
        """Start every service, dependencies first, with `scale` replicas where given."""
        for name in self._in_dependency_order():
            self.scale(name, (scale or {}).get(name, self._declared_replicas(name)))

    def scale(self, service: str, count: int) -> list[Replica]:
        """Start replicas of `service` until it has `count` running (never stops any)."""
        spec = self.services[service]
        for dependency, condition in self._depends_on(spec).items():
            if condition == "service_healthy":
                for replica in self.running(dependency):
                    self.wait_healthy(replica)
        started = []
        while len(self.running(service)) < count:
            started.append(self._start(service, spec))
        for replica in started:
            if "healthcheck" in spec:
                self.wait_healthy(replica)
        return started

    def running(self, service: str) -> list[Replica]:
        return [r for r in self.replicas.get(service, []) if r.process.poll() is None]

    def wait_healthy(self, replica: Replica) -> None:
        check = self.services[replica.service]["healthcheck"]
        test = list(check["test"])
        if test[0] != "CMD":
            raise ComposeError(f"{replica.service}: only exec-form (CMD) health checks are run")
        command = [self._executable(test[1]), *(self._container_arg(replica, a) for a in test[2:])]
        interval = seconds(check.get("interval", "30s"))
        for _ in range(int(check.get("retries", 3)) + 1):
            if replica.process.poll() is not None:
                raise replica.failed("exited")
            probe = subprocess.run(
                command,
                cwd=ROOT,
                capture_output=True,
                timeout=seconds(check.get("timeout", "30s")) + 5,
            )
            if probe.returncode == 0:
                if replica.process.poll() is not None:  # something else answered there
                    raise replica.failed("exited")
                return
            time.sleep(min(interval, 0.5))  # poll faster than compose; the budget stays its own
        raise replica.failed("never became healthy")

    def stop(self, replica: Replica) -> int:
        """SIGTERM, then SIGKILL after the service's stop_grace_period; the exit status."""
        grace = seconds(self.services[replica.service].get("stop_grace_period", "10s"))
        return launch.stop(replica.process, grace)

    def kill(self, replica: Replica) -> None:
        replica.process.kill()
        replica.process.wait()
        self._write_dns()

    def down(self) -> dict[str, int]:
        """Stop every replica, dependents first; the exit status of each by name."""
        codes = {}
        for service in reversed(self._in_dependency_order()):
            for replica in self.replicas.get(service, []):
                codes[replica.name] = self.stop(replica)
        self._write_dns()
        return codes

    def volume(self, name: str) -> Path:
        return self.tmp / "volumes" / name

    def _start(self, service: str, spec: dict[str, Any]) -> Replica:
        replicas = self.replicas.setdefault(service, [])
        index = len(replicas) + 1
        service_number = list(self.services).index(service) + 1
        address = f"127.{self.subnet}.{service_number}.{index}"
        mounts = self._mounts(spec)
        environment = {
            key: self._container_value(address, mounts, str(value))
            for key, value in (spec.get("environment") or {}).items()
        }
        base = {
            "PATH": f"{BIN}{os.pathsep}/usr/bin:/bin",
            "HOME": str(self.tmp),
            "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": str(self.dns_dir),
            "COMPOSE_DNS_FILE": str(self.tmp / "compose-dns.json"),
            "HOSTNAME": f"{service}-{index}",
        }
        command = list(spec["command"])
        log = self.tmp / f"{service}-{index}.log"
        # In the repository root: the image's WORKDIR holds the project, examples included.
        process = launch.spawn(
            [self._executable(command[0]), *command[1:]], {**base, **environment}, log
        )
        replica = Replica(service, index, address, process, log)
        replicas.append(replica)
        self._write_dns()
        return replica

    def _write_dns(self) -> None:
        table = {name: [r.address for r in self.running(name)] for name in self.services}
        target = self.tmp / "compose-dns.json"
        staging = target.with_suffix(".next")
        staging.write_text(json.dumps(table))
        staging.replace(target)

    def _mounts(self, spec: dict[str, Any]) -> list[tuple[str, Path]]:
        mounts = []
        for entry in spec.get("volumes", []):
            source, target = str(entry).split(":")[:2]
            if source not in (self.document.get("volumes") or {}):
                raise ComposeError(f"volume {source!r} is not declared under volumes:")
            mounts.append((target, self.volume(source)))
        return sorted(mounts, key=lambda mount: -len(mount[0]))

    @staticmethod
    def _container_value(address: str, mounts: list[tuple[str, Path]], value: str) -> str:
        if value.startswith("0.0.0.0:"):
            return address + value[len("0.0.0.0") :]
        for target, directory in mounts:
            if value == target or value.startswith(target.rstrip("/") + "/"):
                directory.mkdir(parents=True, exist_ok=True)
                return str(directory) + value[len(target.rstrip("/")) :]
        return value

    @staticmethod
    def _container_arg(replica: Replica, value: str) -> str:
        return value.replace("127.0.0.1:", f"{replica.address}:")

    @staticmethod
    def _executable(name: str) -> str:
        path = BIN / name
        if not path.exists():
            raise ComposeError(f"the image has no command {name!r} (looked in {BIN})")
        return str(path)

    @staticmethod
    def _depends_on(spec: dict[str, Any]) -> dict[str, str]:
        depends = spec.get("depends_on") or {}
        if isinstance(depends, list):
            return {name: "service_started" for name in depends}
        return {name: entry.get("condition", "service_started") for name, entry in depends.items()}

    def _declared_replicas(self, service: str) -> int:
        return int(self.services[service].get("deploy", {}).get("replicas", 1))

    def _in_dependency_order(self) -> list[str]:
        ordered: list[str] = []

        def visit(name: str, path: tuple[str, ...]) -> None:
            if name in path:
                raise ComposeError(f"dependency cycle: {' -> '.join((*path, name))}")
            if name in ordered:
                return
            if name not in self.services:
                raise ComposeError(f"{path[-1]} depends on unknown service {name!r}")
            for dependency in self._depends_on(self.services[name]):
                visit(dependency, (*path, name))
            ordered.append(name)

        for name in self.services:
            visit(name, ())
        return ordered
