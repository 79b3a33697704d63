"""Review: configuration as a careless operator sets it.

Each option either works as documented, or stops the process at start with exit status 2 and a
line naming the flag or variable (docs/configuration.md: "A value that does not parse stops the
service at once with exit status 2 and a message naming the flag and the environment variable";
docs/security.md: "a file that holds no PEM certificate ... stops the process with a line naming
the file"). Never a traceback, a crash, a silent wrong value, or a start that looks healthy and
then fails every call.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from devtools.launch import inference_command, read_json, trainer_command
from devtools.ports import free_port
from tests.integration.conftest import ROOT, Services

STAMP = "tests.integration.apps:stamp"
STEPS = "tests.integration.experience_apps:steps"
QUIET_INFERENCE = ("--metrics-listen", "off", "--sync-relay", "off")
QUIET_TRAINER = ("--metrics-listen", "off", "--max-runs", "1")


class Outcome:
    """What became of a process: `code` its exit status if it exited on its own within the
    time given (None: still running, then stopped), `ready` whether its ready file appeared,
    `log` its output."""

    def __init__(self, code: int | None, ready: bool, log: str) -> None:
        self.code, self.ready, self.log = code, ready, log

    def __repr__(self) -> str:
        return f"Outcome(code={self.code}, ready={self.ready}, log=...{self.log[-2500:]})"


def watch(
    services: Services,
    command: list[str],
    name: str,
    *,
    env: dict[str, str] | None = None,
    ready: Path | None = None,
    until_ready: bool = False,
    timeout: float = 25.0,
) -> Outcome:
    """Run `command` until it exits or `timeout` passes (with `until_ready`, until its ready
    file appears), then stop it if it still runs."""
    process = services.spawn(command, name, env=env)
    deadline = time.monotonic() + timeout
    seen = False
    while time.monotonic() < deadline and process.poll() is None:
        seen = seen or (ready is not None and read_json(ready) is not None)
        if seen and until_ready:
            break
        time.sleep(0.1)
    code = process.poll()
    seen = seen or (ready is not None and ready.exists())
    if code is None:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
    return Outcome(code, seen, services.log(name))


def inference(services: Services, *extra: str, name: str = "inference", **kw: object) -> Outcome:
    ready = services.directory / f"{name}.ready.json"
    ready.unlink(missing_ok=True)
    command = inference_command(STAMP, ready, *QUIET_INFERENCE, *extra)
    return watch(services, command, name, ready=ready, **kw)  # type: ignore[arg-type]


def trainer(
    services: Services,
    targets: list[str],
    *extra: str,
    app: str = STAMP,
    name: str = "trainer",
    **kw: object,
) -> Outcome:
    ready = services.directory / f"{name}.ready.json"
    ready.unlink(missing_ok=True)
    command = trainer_command(app, targets, *QUIET_TRAINER, "--ready-file", str(ready), *extra)
    return watch(services, command, name, ready=ready, **kw)  # type: ignore[arg-type]


def assert_refused(outcome: Outcome, *names: str) -> None:
    """Exit status 2, no traceback, and a message naming one of `names`."""
    assert outcome.code == 2, outcome
    assert "Traceback" not in outcome.log, outcome
    assert any(name in outcome.log for name in names), outcome


# --- TLS options given in halves ---------------------------------------------------------


@pytest.mark.parametrize(
    "flags",
    [
        ("--tls-cert", "{pki}/server.pem"),
        ("--tls-client-ca", "{pki}/ca.pem"),
    ],
    ids=["cert-without-key", "client-ca-without-cert"],
)
def test_inference_tls_half_configured_is_refused_with_a_line(
    services: Services, pki: Path, flags: tuple[str, str]
) -> None:
    """--tls-cert without --tls-key (or a client CA with no certificate) ends in a
    `ValueError: a TLS server needs both a certificate and a key` traceback, exit status 1."""
    outcome = inference(services, flags[0], flags[1].format(pki=pki))
    assert_refused(outcome, "--tls-key", "INFERENCE_TLS_KEY", "--tls-cert", "INFERENCE_TLS_CERT")


def test_inference_tls_key_without_cert_does_not_serve_plaintext(
    services: Services, pki: Path
) -> None:
    """INFERENCE_TLS_KEY set (its certificate's variable mistyped or forgotten) serves both
    planes in plaintext without a word; the peer and experience pairs are refused ("go
    together"), this one is not."""
    outcome = inference(services, "--tls-key", str(pki / "server.key"), until_ready=True)
    assert_refused(outcome, "--tls-cert", "INFERENCE_TLS_CERT")


def test_trainer_tls_key_without_cert_does_not_push_plaintext(
    services: Services, pki: Path
) -> None:
    """TRAINER_TLS_KEY alone: the trainer pushes in plaintext, the key silently unused (with
    --tls-cert alone it stops: 'mutual TLS needs both a client certificate and its key')."""
    served = services.inference(STAMP)
    outcome = trainer(services, [served.sync], "--tls-key", str(pki / "client.key"))
    assert_refused(outcome, "--tls-cert", "TRAINER_TLS_CERT")


def test_trainer_experience_tls_key_without_cert_is_refused(services: Services, pki: Path) -> None:
    """--experience-tls-key alone serves the experience plane in plaintext without a word."""
    outcome = trainer(
        services,
        ["127.0.0.1:1"],
        "--experience-listen",
        "127.0.0.1:0",
        "--experience-tls-key",
        str(pki / "server.key"),
        app=STEPS,
        until_ready=True,
    )
    assert_refused(outcome, "--experience-tls-cert", "TRAINER_EXPERIENCE_TLS_CERT")


def test_trainer_checks_its_tls_files_before_it_says_it_is_ready(
    services: Services, tmp_path: Path
) -> None:
    """A missing --tls-ca is found only after the ready file is written: orchestration sees a
    ready trainer that exits with status 2 a moment later."""
    outcome = trainer(services, ["127.0.0.1:1"], "--tls-ca", str(tmp_path / "missing.pem"))
    assert outcome.code == 2, outcome
    assert not outcome.ready, outcome


# --- tokens as files and secrets hand them over ------------------------------------------


@pytest.mark.parametrize(
    ("variable", "value"),
    [("INFERENCE_SYNC_TOKEN", "s3cret\n"), ("INFERENCE_DATA_TOKEN", "d4ta\r\n")],
    ids=["sync-newline", "data-crlf"],
)
def test_inference_token_no_client_can_send_is_refused(
    services: Services, variable: str, value: str
) -> None:
    """A token read from a file with its trailing newline (CRLF from a Windows editor) starts a
    service that looks healthy and answers every call UNAUTHENTICATED: no gRPC client can put
    a newline in metadata (sending it fails INTERNAL 'Invalid metadata')."""
    outcome = inference(services, env={variable: value}, until_ready=True)
    assert_refused(outcome, variable)


def test_trainer_token_with_a_trailing_newline_is_refused_or_works(services: Services) -> None:
    """TRAINER_SYNC_TOKEN='s3cret\\n': every push fails INTERNAL 'Invalid metadata' and the
    trainer retries for ever instead of refusing the token at start."""
    services.env["INFERENCE_SYNC_TOKEN"] = "s3cret"
    served = services.inference(STAMP, name="guarded")
    del services.env["INFERENCE_SYNC_TOKEN"]
    outcome = trainer(services, [served.sync], env={"TRAINER_SYNC_TOKEN": "s3cret\n"})
    assert outcome.code in (0, 2), outcome
    if outcome.code == 2:
        assert_refused(outcome, "TRAINER_SYNC_TOKEN")
    else:
        assert served.model_state("stamp", token="s3cret").version >= 1


# --- paths -------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["directory", "under-a-file"])
def test_trainer_ready_file_that_cannot_be_written_is_refused_with_a_line(
    services: Services, tmp_path: Path, where: str
) -> None:
    """The inference service answers a bad --ready-file with exit status 2; the trainer with a
    traceback (IsADirectoryError / FileExistsError) and exit status 1."""
    (tmp_path / "a-dir").mkdir()
    (tmp_path / "a-file").write_text("x")
    path = tmp_path / ("a-dir" if where == "directory" else "a-file/ready.json")
    command = trainer_command(STAMP, ["127.0.0.1:1"], *QUIET_TRAINER, "--ready-file", str(path))
    outcome = watch(services, command, "trainer")
    assert_refused(outcome, "--ready-file", "TRAINER_READY_FILE", str(path))


# --- sizes, counts and durations out of range --------------------------------------------


@pytest.mark.parametrize("module", ["inference", "trainer"])
def test_a_huge_torch_thread_count_is_refused_not_a_crash(services: Services, module: str) -> None:
    """--torch-threads 100000 (docs: N >= 0) passes parsing and kills the process with SIGSEGV
    (after `RuntimeError: can't start new thread`)."""
    if module == "inference":
        outcome = inference(services, "--torch-threads", "100000", until_ready=True)
        assert_refused(outcome, "--torch-threads", "INFERENCE_TORCH_THREADS")
    else:
        outcome = trainer(services, ["127.0.0.1:1"], "--torch-threads", "100000", until_ready=True)
        assert_refused(outcome, "--torch-threads", "TRAINER_TORCH_THREADS")


@pytest.mark.parametrize(
    ("flag", "env"),
    [
        ("--connect-timeout", "TRAINER_CONNECT_TIMEOUT"),
        ("--push-stall-timeout-s", "TRAINER_PUSH_STALL_TIMEOUT_S"),
        ("--push-timeout", "TRAINER_PUSH_TIMEOUT"),
        ("--run-interval", "TRAINER_RUN_INTERVAL"),
    ],
)
def test_a_huge_trainer_duration_is_refused_or_honoured(
    services: Services, flag: str, env: str
) -> None:
    """1e10 s parses as a duration; then --connect-timeout, --push-stall-timeout-s and
    --run-interval end the trainer in an OverflowError traceback (exit status 1), and
    --push-timeout makes every push fail DEADLINE_EXCEEDED at once, retried for ever."""
    served = services.inference(STAMP)
    extra = ("--max-runs", "2") if flag == "--run-interval" else ()
    outcome = trainer(services, [served.sync], flag, "1e10", *extra, timeout=20)
    assert "Traceback" not in outcome.log, outcome
    if flag == "--run-interval":
        # a long interval is what was asked for: it waits, it does not crash
        assert outcome.code in (None, 2), outcome
    else:
        assert outcome.code in (0, 2), outcome
    if outcome.code == 2:
        assert_refused(outcome, flag, env)


def test_a_huge_grace_does_not_end_in_a_traceback(services: Services) -> None:
    """--grace 1e10 parses; SIGTERM then ends in `OverflowError: timestamp out of range for
    platform time_t` in gRPC's cancel_all_calls_after_grace thread."""
    outcome = inference(services, "--grace", "1e10", until_ready=True)
    if not outcome.ready:  # refused at start: durations past a year are
        assert_refused(outcome, "--grace", "INFERENCE_GRACE")
    assert "Traceback" not in outcome.log, outcome


def test_trainer_groups_with_no_group_in_them_are_refused(
    services: Services, tmp_path: Path
) -> None:
    """--trainer-groups ';' parses to no groups at all; the trainer then stands by for ever
    ('every state directory () is held by another process') instead of saying the flag names
    no group."""
    outcome = trainer(
        services,
        ["127.0.0.1:1"],
        "--trainer-groups",
        ";",
        "--state-dir",
        str(tmp_path / "state"),
        timeout=20,
    )
    assert_refused(outcome, "--trainer-groups", "TRAINER_GROUPS")


# --- addresses ---------------------------------------------------------------------------


def test_inference_bind_failure_names_the_flag(services: Services) -> None:
    """Both planes given the same port: 'cannot listen on 127.0.0.1:P' names neither
    --listen nor --sync-listen (the trainer says '--experience-listen: cannot listen ...')."""

    address = f"127.0.0.1:{free_port()}"
    outcome = inference(services, "--listen", address, "--sync-listen", address)
    assert_refused(
        outcome, "--listen", "INFERENCE_LISTEN", "--sync-listen", "INFERENCE_SYNC_LISTEN"
    )


def test_inference_ipv6_without_brackets_is_refused_at_parse(services: Services) -> None:
    """--listen ::1:8001 passes parsing (the trainer's --inference refuses it: 'write an IPv6
    address in brackets'); gRPC then reads it as [::0.1.0.0]:443 and the message names neither
    the flag nor the brackets."""
    outcome = inference(services, "--listen", "::1:0")
    assert_refused(outcome, "--listen", "INFERENCE_LISTEN")
    assert "bracket" in outcome.log, outcome


# --- the health check --------------------------------------------------------------------


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "1e10"])
def test_healthcheck_timeout_out_of_range_does_not_call_a_healthy_server_dead(
    services: Services, value: str
) -> None:
    """`python -m shared.healthcheck ADDR --timeout 0|-1|nan|inf|1e10` answers a SERVING server
    with 'DEADLINE_EXCEEDED' and exit status 1: an orchestrator restarts a healthy replica.
    A nonsensical value should be a usage error naming --timeout."""
    served = services.inference(STAMP)
    done = subprocess.run(
        [sys.executable, "-m", "shared.healthcheck", served.data, f"--timeout={value}"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=services.env,
        timeout=30,
    )
    # A usage error naming --timeout, for a huge one too (a deadline past a year is one no
    # orchestrator means): never a healthy server called dead.
    assert "DEADLINE_EXCEEDED" not in done.stderr, done.stderr
    assert "--timeout" in done.stderr, done.stderr


def test_healthcheck_with_a_token_read_with_its_newline_still_checks_health(
    services: Services,
) -> None:
    """The health check sends INFERENCE_DATA_TOKEN when set (shared/healthcheck.py: health
    needs no token). The same secret file with its trailing newline makes every check fail
    'INTERNAL: Invalid metadata' (exit 1) against a SERVING server: an orchestrator restarts
    healthy replicas for ever, with no word about the variable."""
    served = services.inference(STAMP)
    done = subprocess.run(
        [sys.executable, "-m", "shared.healthcheck", served.data],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**services.env, "INFERENCE_DATA_TOKEN": "d4ta\n"},
        timeout=30,
    )
    assert done.returncode == 0 or "INFERENCE_DATA_TOKEN" in done.stderr, done.stderr
