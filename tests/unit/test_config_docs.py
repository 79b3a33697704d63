"""docs/configuration.md must be what the settings declarations generate today."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[2]


def generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "gen_config_docs", ROOT / "scripts" / "gen_config_docs.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_configuration_doc_matches_the_declarations() -> None:
    fresh = generator().render()
    committed = (ROOT / "docs" / "configuration.md").read_text()
    assert committed == fresh, "docs/configuration.md is stale: run `make docs`"


def test_the_doc_names_every_flag_and_variable() -> None:
    from inference_service.settings import OPTIONS as INFERENCE
    from shared.settings import PROCESS_OPTIONS
    from trainer_service.settings import OPTIONS as TRAINER

    text = generator().render()
    for option in [*INFERENCE, *TRAINER, *PROCESS_OPTIONS]:
        assert f"`{option.env}`" in text
        assert option.flag is None or f"`{option.flag}" in text
