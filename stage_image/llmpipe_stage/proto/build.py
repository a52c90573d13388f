"""Regenerate `stage_pb2.py`, `stage_pb2.pyi` and `stage_pb2_grpc.py` from `stage.proto`.

Run as `make proto` (or `python -m llmpipe_stage.proto.build [--out DIR]`). It needs
grpcio-tools (the `dev` extra). The import root is `stage_image/`, so the generated gRPC
module imports `llmpipe_stage.proto.stage_pb2` as a package module.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent
IMPORT_ROOT = PROTO_DIR.parent.parent  # stage_image/
PROTO_FILE = "llmpipe_stage/proto/stage.proto"
MYPY_HEADER = "# mypy: ignore-errors\n"


def generate(out_root: Path) -> list[Path]:
    """Run protoc into `out_root` (an import root); return the generated files."""
    import grpc_tools
    from grpc_tools import protoc  # dev-only dependency, imported when asked for

    well_known = Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{IMPORT_ROOT}",
        f"-I{well_known}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        PROTO_FILE,
    ]
    code = protoc.main(args)
    if code != 0:
        raise RuntimeError(f"protoc failed with exit code {code} on {PROTO_FILE}")
    out_dir = out_root / "llmpipe_stage" / "proto"
    generated = sorted(out_dir.glob("stage_pb2*"))
    for path in generated:
        # protoc's output is untyped (and protobuf ships no stubs): keep mypy out of it.
        path.write_text(MYPY_HEADER + path.read_text())
    return generated


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--out",
        type=Path,
        default=IMPORT_ROOT,
        help="import root to write into (default: stage_image/)",
    )
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(f"generated {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
