"""Settings declared once (shared/settings.py): flag > environment > default, the converters,
and bad values refused with exit status 2 and a message naming the flag and the variable."""

from __future__ import annotations

from pathlib import Path

import pytest

from inference_service.settings import OPTIONS as INFERENCE_OPTIONS
from inference_service.settings import InferenceSettings
from shared import cli
from shared.settings import PROCESS_OPTIONS, Option, ProcessSettings
from trainer_service.settings import OPTIONS as TRAINER_OPTIONS
from trainer_service.settings import TrainerSettings

APP = ["--models", "pkg.mod:app"]


def inference(argv: list[str], environ: dict[str, str]) -> InferenceSettings:
    return InferenceSettings.from_args([*APP, *argv], environ)


def refused(capsys: pytest.CaptureFixture[str], argv: list[str], environ: dict[str, str]) -> str:
    """What the parser said when it refused `argv` and `environ` (with status 2)."""
    with pytest.raises(SystemExit) as exited:
        InferenceSettings.from_args(argv, environ)
    assert exited.value.code == 2
    return " ".join(capsys.readouterr().err.split())


def test_a_flag_beats_the_environment_which_beats_the_default() -> None:
    env = {"INFERENCE_HISTORY": "4", "INFERENCE_GRACE": "2m"}
    assert inference(["--history", "3"], env).history == 3
    assert inference([], env).history == 4
    assert inference([], {}).history == InferenceSettings(models="x").history == 5
    assert inference([], env).grace == 120.0
    assert inference(["--grace", "500ms"], env).grace == 0.5


def test_an_empty_environment_variable_counts_as_unset() -> None:
    assert inference([], {"INFERENCE_LISTEN": ""}).listen == "127.0.0.1:8001"


def test_the_environment_alone_can_name_the_app() -> None:
    settings = InferenceSettings.from_args([], {"INFERENCE_MODELS": "a.b:c"})
    assert settings == InferenceSettings(models="a.b:c")


def test_a_switch_is_set_by_its_flag_or_by_true_or_false_in_the_environment() -> None:
    assert inference(["--allow-open-sync"], {}).allow_open_sync is True
    assert inference([], {"INFERENCE_ALLOW_OPEN_SYNC": "yes"}).allow_open_sync is True
    assert inference([], {"INFERENCE_ALLOW_OPEN_SYNC": "0"}).allow_open_sync is False
    assert inference([], {}).allow_open_sync is False


def test_units_are_taken_and_bare_numbers_keep_the_flags_unit() -> None:
    settings = inference(
        ["--max-push-bytes", "2GiB", "--max-queue-delay-ms", "2", "--sync-max-mb-per-s", "50"],
        {"INFERENCE_MAX_HEADER_BYTES": "65536", "INFERENCE_PUSH_IDLE_TIMEOUT_S": "1.5"},
    )
    assert settings.max_push_bytes == 2 << 30
    assert settings.max_header_bytes == 65536
    assert settings.max_queue_delay_s == pytest.approx(0.002)
    assert settings.sync_max_bytes_per_s == 50e6
    assert settings.push_idle_timeout_s == 1.5


def test_choices_are_folded_to_their_case() -> None:
    settings = inference(["--sync-relay", "ON"], {"INFERENCE_LOG_LEVEL": "warning"})
    assert (settings.sync_relay, settings.log_level) == ("on", "WARNING")


def test_the_trainers_lists_and_groups() -> None:
    settings = TrainerSettings.from_args(
        ["--models", "m:a", "--inference", "a:1, b:2"],
        {"TRAINER_GROUPS": "sine;cosine,tan", "TRAINER_PUSH_TIMEOUT": "10m"},
    )
    assert settings.inference == ("a:1", "b:2")
    assert settings.trainer_groups == (("sine",), ("cosine", "tan"))
    assert settings.push_timeout == 600.0
    assert TrainerSettings(models="m:a").inference == ("127.0.0.1:8101",)


@pytest.mark.parametrize(
    ("argv", "environ", "fragments"),
    [
        (["--history", "abc"], {}, ["--history / INFERENCE_HISTORY", "'abc' is not a whole"]),
        ([], {"INFERENCE_HISTORY": "0"}, ["--history / INFERENCE_HISTORY", "(from INFERENCE_"]),
        (
            ["--max-push-bytes", "12 furlongs"],
            {},
            ["--max-push-bytes / INFERENCE_MAX_PUSH_BYTES", "unknown unit 'furlongs'"],
        ),
        ([], {"INFERENCE_GRACE": "-1"}, ["--grace / INFERENCE_GRACE", "'-1' is not a non-neg"]),
        (
            ["--push-idle-timeout-s", "0"],
            {},
            ["--push-idle-timeout-s / INFERENCE_PUSH_IDLE_TIMEOUT_S", "not a positive duration"],
        ),
        (["--sync-nice", "20"], {}, ["--sync-nice / INFERENCE_SYNC_NICE", "20 is more than 19"]),
        (
            [],
            {"INFERENCE_SYNC_RELAY": "sometimes"},
            ["--sync-relay / INFERENCE_SYNC_RELAY", "'sometimes' is not one of auto, on, off"],
        ),
        (
            ["--listen", "8001"],
            {},
            ["--listen / INFERENCE_LISTEN", "'8001' is not HOST:PORT", "(from --listen)"],
        ),
        (
            [],
            {"INFERENCE_ALLOW_OPEN_SYNC": "maybe"},
            ["--allow-open-sync / INFERENCE_ALLOW_OPEN_SYNC", "'maybe' is not true or false"],
        ),
    ],
)
def test_a_bad_value_exits_2_naming_the_flag_and_the_variable(
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    environ: dict[str, str],
    fragments: list[str],
) -> None:
    said = refused(capsys, [*APP, *argv], environ)
    assert said.startswith("usage: inference-service")
    for fragment in fragments:
        assert fragment in said


def test_a_missing_app_exits_2_naming_the_flag_and_the_variable(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert "--models / INFERENCE_MODELS is required" in refused(capsys, [], {})


def test_a_trainer_id_over_256_bytes_exits_2_as_replicas_would_refuse_it(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert TrainerSettings.from_args([*APP, "--trainer-id", "é" * 128]).writer_id == "é" * 128
    with pytest.raises(SystemExit) as exited:
        TrainerSettings.from_args(APP, {"TRAINER_ID": "t" * 257})
    assert exited.value.code == 2
    said = " ".join(capsys.readouterr().err.split())
    assert "--trainer-id / TRAINER_ID" in said
    assert "is 257 bytes in UTF-8; at most 256" in said


def test_the_process_wide_knobs_come_from_the_environment() -> None:
    assert ProcessSettings.from_environ({}, "p") == ProcessSettings(prefetch=None, malloc="tuned")
    chosen = ProcessSettings.from_environ(
        {"WEIGHTSYNC_PREFETCH": "1", "WEIGHTSYNC_MALLOC": "Default"}, "p"
    )
    assert chosen == ProcessSettings(prefetch=True, malloc="default")
    assert ProcessSettings.from_environ({"WEIGHTSYNC_PREFETCH": "0"}, "p").prefetch is False
    assert ProcessSettings.from_environ({"WEIGHTSYNC_PREFETCH": "auto"}, "p").prefetch is None


@pytest.mark.parametrize(
    ("environ", "fragment"),
    [
        ({"WEIGHTSYNC_PREFETCH": "sometimes"}, "WEIGHTSYNC_PREFETCH: 'sometimes' is not auto"),
        ({"WEIGHTSYNC_MALLOC": "jemalloc"}, "WEIGHTSYNC_MALLOC: 'jemalloc' is not one of tuned"),
    ],
)
def test_a_bad_process_wide_knob_exits_2_naming_it(
    capsys: pytest.CaptureFixture[str], environ: dict[str, str], fragment: str
) -> None:
    with pytest.raises(SystemExit) as exited:
        ProcessSettings.from_environ(environ, "inference-service")
    assert exited.value.code == 2
    said = capsys.readouterr().err
    assert said.startswith("usage: inference-service") and fragment in said


@pytest.mark.parametrize(
    ("text", "unit", "seconds"),
    [
        ("10", "s", 10.0),
        ("0.5", "ms", 0.0005),
        ("500ms", "s", 0.5),
        ("2m", "ms", 120.0),
        ("1.5 h", "s", 5400.0),
        ("1e3ms", "s", 1.0),
    ],
)
def test_durations(text: str, unit: str, seconds: float) -> None:
    assert cli.seconds(text, unit) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "abc", "-1", "5 fortnights", "inf", "nan", "1e999"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError, match=r"duration|unit"):
        cli.seconds(text)


def test_a_positive_duration_refuses_zero() -> None:
    assert cli.seconds("0") == 0.0
    with pytest.raises(ValueError, match="not a positive duration"):
        cli.seconds("0", positive=True)


@pytest.mark.parametrize(
    ("text", "nbytes"),
    [
        ("1048576", 1 << 20),
        ("64GiB", 64 << 30),
        ("16 mib", 16 << 20),
        ("1.5KiB", 1536),
        ("1.1GB", 1_100_000_000),
        ("7B", 7),
    ],
)
def test_sizes(text: str, nbytes: int) -> None:
    assert cli.nbytes(text) == nbytes


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("0", "less than 1 byte"),
        ("-5", "less than 1 byte"),
        ("1.5B", "not a whole number of bytes"),
        ("12 furlongs", "unknown unit 'furlongs'"),
        ("lots", "unknown unit 'lots'"),
        ("1..2MiB", "is not a size"),
    ],
)
def test_bad_sizes(text: str, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        cli.nbytes(text)


def test_sizes_show_in_the_largest_exact_binary_unit() -> None:
    assert [cli.show_size(n) for n in (64 << 30, 1536, 1000, 0)] == ["64GiB", "1536", "1000", "0"]


@pytest.mark.parametrize(("text", "value"), [("on", True), ("YES", True), ("0", False)])
def test_booleans(text: str, value: bool) -> None:
    assert cli.boolean(text) is value
    assert cli.auto_boolean(text) is value


def test_paths_and_lists() -> None:
    assert cli.path("/state/{slot}") == Path("/state/{slot}")
    with pytest.raises(ValueError, match="expected a path"):
        cli.path(" ")
    assert cli.name_list(" a, b,,c ") == ("a", "b", "c")
    with pytest.raises(ValueError, match="one or more HOST:PORT"):
        cli.address_list(" , ")
    assert cli.optional_host_port("OFF") is None


ALL = [*INFERENCE_OPTIONS, *TRAINER_OPTIONS, *PROCESS_OPTIONS]


@pytest.mark.parametrize("option", ALL, ids=[o.env for o in ALL])
def test_each_shown_default_reads_back_as_the_default(option: Option) -> None:
    """--help and docs/configuration.md show each default as text that parses to it."""
    if option.required or option.default is None or option.default_text is not None:
        return
    parsed = option.convert.parse(option.shown_default)
    if isinstance(option.default, float):
        assert parsed == pytest.approx(option.default)
    else:
        assert parsed == option.default


@pytest.mark.parametrize(
    ("declared", "prefix"),
    [
        (INFERENCE_OPTIONS, "INFERENCE_"),
        (TRAINER_OPTIONS, "TRAINER_"),
        (PROCESS_OPTIONS, "WEIGHTSYNC_"),
    ],
)
def test_names_are_unique_and_each_variable_carries_its_services_prefix(
    declared: list[Option], prefix: str
) -> None:
    flags = [o.flag for o in declared if o.flag is not None]
    assert len(set(flags)) == len(flags) and len({o.env for o in declared}) == len(declared)
    assert all(o.env.startswith(prefix) for o in declared)


def test_a_mistyped_variable_under_the_services_prefix_is_named_in_a_warning(
    capsys: pytest.CaptureFixture[str],
) -> None:
    env = {
        "INFERENCE_HISTROY": "3",  # mistyped: the default stays, and a warning says so
        "INFERENCE_HISTORY_X": "",  # empty counts as unset
        "INFERENCE_GRACE": "2s",
        "TRAINER_PUSH_TIMOUT": "1",  # the other service's prefix is not this one's business
        "WEIGHTSYNC_RELAY_TOKEN": "x",
    }
    assert inference([], env).history == 5
    err = capsys.readouterr().err
    assert err.splitlines() == [
        "inference-service: warning: INFERENCE_HISTROY is set, but no option reads it, so it "
        "has no effect; did you mean INFERENCE_HISTORY?"
    ]
    TrainerSettings.from_args(["--models", "pkg.mod:app"], {"TRAINER_PUSH_TIMOUT": "1"})
    assert "did you mean TRAINER_PUSH_TIMEOUT?" in capsys.readouterr().err
    inference([], {"INFERENCE_HISTORY": "3", "INFERENCE_GRACE": "2s"})
    assert capsys.readouterr().err == ""
