"""The committed generated code must be exactly what proto/ generates today."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_generated_code_matches_the_protos(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_proto.py"), "--out", str(tmp_path)],
        check=True,
        cwd=ROOT,
    )
    fresh = _generated(tmp_path)
    committed = _generated(ROOT)
    assert fresh.keys() == committed.keys(), "run `make proto`: generated files differ"
    stale = sorted(str(path) for path, text in fresh.items() if committed[path] != text)
    assert not stale, f"run `make proto`: {', '.join(stale)} drifted from proto/"


def _generated(root: Path) -> dict[Path, str]:
    """Generated sources under root/shared/gen (not the bytecode Python caches beside them)."""
    files = (root / "shared/gen").rglob("*_pb2*")
    return {p.relative_to(root): p.read_text() for p in files if p.suffix in (".py", ".pyi")}


def test_our_messages_and_tritonclients_live_side_by_side() -> None:
    """Both define the `inference` proto package; our private pool keeps them from colliding."""
    code = (
        "import tritonclient.grpc.service_pb2 as theirs\n"
        "from shared.gen.inference import grpc_service_pb2 as ours\n"
        "data = ours.ModelInferRequest(model_name='m', id='7').SerializeToString()\n"
        "assert theirs.ModelInferRequest.FromString(data).id == '7'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
