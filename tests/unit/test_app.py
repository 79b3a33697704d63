"""The App definition and the import string both services take."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from shared.app import App, TensorSpec, load_app
from shared.errors import ConfigurationError


@pytest.fixture
def in_tmp_dir(tmp_path: Path) -> Iterator[Path]:
    before, path = os.getcwd(), list(sys.path)
    os.chdir(tmp_path)
    try:
        yield tmp_path
    finally:
        os.chdir(before)
        sys.path[:] = path
        sys.modules.pop("my_models", None)


def test_a_users_own_module_resolves_against_the_current_directory(in_tmp_dir: Path) -> None:
    (in_tmp_dir / "my_models.py").write_text("from shared import App\nmodels = App()\n")
    assert isinstance(load_app("my_models:models"), App)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("nocolon", "must look like 'package.module:attribute'"),
        ("no_such_module_xyz:app", "cannot import module 'no_such_module_xyz'"),
        ("shared.app:nothing", "has no attribute 'nothing'"),
        ("shared.app:TensorSpec", "is a type, not a shared.App"),
    ],
)
def test_bad_import_strings_say_what_is_wrong(spec: str, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        load_app(spec)


def test_definitions_are_checked() -> None:
    app = App()
    app.add_model("m", lambda: None, inputs=[TensorSpec("x", "FP32", (-1,))])  # type: ignore[arg-type,return-value]
    with pytest.raises(ConfigurationError, match="model 'm' is defined twice"):
        app.add_model("m", lambda: None)  # type: ignore[arg-type,return-value]
    with pytest.raises(ConfigurationError, match="datatype 'FLOAT' is not one of"):
        TensorSpec("x", "FLOAT", (1,))
    with pytest.raises(ConfigurationError, match="sizes >= 0 or -1 only"):
        TensorSpec("x", "FP32", (-2,))
    with pytest.raises(ConfigurationError, match="input names repeat"):
        app.add_model(
            "n", lambda: None, inputs=[TensorSpec("x", "FP32", ()), TensorSpec("x", "FP32", ())]
        )  # type: ignore[arg-type,return-value]


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "nul\0", "é" * 101, "\ud800"], ids=repr)
def test_names_that_cannot_name_a_file_are_refused_as_declared(name: str) -> None:
    """Models, trainers and buffers name files in the state directories: a name a file cannot
    carry (past 200 UTF-8 bytes, a path component of its own) is refused when it is declared,
    not found out at the first checkpoint."""
    app = App()
    with pytest.raises(ConfigurationError, match="model name"):
        app.add_model(name, lambda: None)
    with pytest.raises(ConfigurationError, match="trainer name"):
        app.add_trainer(name, lambda: None)
    with pytest.raises(ConfigurationError, match="buffer name"):
        app.add_buffer(name, lambda: None, tensors=[TensorSpec("x", "FP32", (1,))])
    app.add_model("é" * 100, lambda: None)  # 200 bytes: the most a name may take
