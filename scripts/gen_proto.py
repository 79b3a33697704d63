"""Regenerate the Python gRPC code for every .proto under proto/ into shared/gen/.

    python scripts/gen_proto.py            # rewrite shared/gen in place (`make proto`)
    python scripts/gen_proto.py --out DIR  # write the tree under DIR (the drift test does)

protoc's include path maps proto/ onto shared/gen/, so generated imports already read
`from shared.gen.<package> import ..._pb2`. One post-processing step follows: each module registers
its descriptors in `shared.gen.POOL` instead of protobuf's default pool
(see shared/gen/__init__.py).
"""

from __future__ import annotations

import argparse
import pathlib
import sys

from grpc_tools import protoc

ROOT = pathlib.Path(__file__).resolve().parent.parent
GEN_PACKAGE = "shared/gen"
DEFAULT_POOL = "_descriptor_pool.Default().AddSerializedFile("
BUILDER_IMPORT = "from google.protobuf.internal import builder as _builder\n"


def generate(out: pathlib.Path) -> list[pathlib.Path]:
    """Run protoc over proto/ into `out` and return the generated files."""
    protos = sorted(p.relative_to(ROOT) for p in (ROOT / "proto").rglob("*.proto"))
    args = [
        "grpc_tools.protoc",
        f"-I{GEN_PACKAGE}=proto",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *(str(p) for p in protos),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    generated = sorted((out / GEN_PACKAGE).rglob("*_pb2*.py*"))
    for path in generated:
        if path.name.endswith("_pb2.py"):
            _use_private_pool(path)
    return generated


def _use_private_pool(path: pathlib.Path) -> None:
    text = path.read_text()
    if DEFAULT_POOL not in text or BUILDER_IMPORT not in text:
        raise SystemExit(f"{path}: unexpected protoc output; update scripts/gen_proto.py")
    text = text.replace(DEFAULT_POOL, "_POOL.AddSerializedFile(", 1)
    text = text.replace(
        BUILDER_IMPORT, BUILDER_IMPORT + "from shared.gen import POOL as _POOL\n", 1
    )
    path.write_text(text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, default=ROOT, help="root of the output tree")
    out = parser.parse_args().out.resolve()
    if out == ROOT:
        for stale in (ROOT / GEN_PACKAGE).rglob("*_pb2*.py*"):
            stale.unlink()
    generate(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
