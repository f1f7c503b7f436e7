"""Generate kilnlm's Python gRPC stubs from protos/ — the one way stubs are made.

    python protos/generate.py            # writes kilnlm/proto/*_pb2*.py(i)
    python protos/generate.py --out DIR  # somewhere else (the freshness test compares the two)

``pip install .`` / ``pip install -e .`` run this too (setup.py's build step), so an installed
kilnlm always has stubs that match its protos. The output is never edited by hand: every file
starts with a DO NOT EDIT line naming its source.

protoc writes ``kiln/v1/generation_pb2.py`` with absolute imports such as
``from kiln.v1 import generation_pb2``; the stubs live inside our package instead (one name in
site-packages, see DESIGN.md), so the files are flattened into ``kilnlm/proto/`` and those imports
rewritten to ``from kilnlm.proto import ...``.

This script imports nothing from kilnlm (setup.py runs it before kilnlm's dependencies exist) and
needs only grpcio-tools.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PROTO_ROOT = REPO / "protos"
DEFAULT_OUT = REPO / "kilnlm" / "proto"
PROTO_PACKAGE = "kiln.v1"
PYTHON_PACKAGE = "kilnlm.proto"
SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def proto_files(root: Path = PROTO_ROOT) -> list[Path]:
    """Every .proto of the API, in a stable order (relative to ``root``)."""
    return sorted(p.relative_to(root) for p in (root / "kiln" / "v1").glob("*.proto"))


def run_protoc(root: Path, protos: list[Path], out: Path) -> None:
    """grpc_tools' bundled protoc: messages (+ .pyi type stubs) and gRPC service stubs."""
    from grpc_tools import protoc  # a build-time dependency only

    include = Path(protoc.__file__).parent / "_proto"  # google/protobuf/*.proto
    args = [
        "grpc_tools.protoc",
        f"-I{root}",
        f"-I{include}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *map(str, protos),
    ]
    if protoc.main(args) != 0:
        raise SystemExit(f"protoc failed on {', '.join(map(str, protos))} (see the message above)")


def rewrite(text: str, source: Path) -> str:
    """Point imports of sibling stubs into kilnlm.proto and put our DO NOT EDIT line on top."""
    package = re.escape(PROTO_PACKAGE)
    text = re.sub(rf"^from {package} import ", f"from {PYTHON_PACKAGE} import ", text, flags=re.M)
    text = re.sub(rf"^import {package}\.", f"import {PYTHON_PACKAGE}.", text, flags=re.M)
    header = f"# DO NOT EDIT: generated from protos/{source.as_posix()} by protos/generate.py.\n"
    return header + text


def generate(out: Path = DEFAULT_OUT, root: Path = PROTO_ROOT) -> list[Path]:
    """Write the stubs of every proto under ``root`` into ``out``; returns the files written."""
    protos = proto_files(root)
    if not protos:
        raise SystemExit(f"no .proto files under {root / 'kiln' / 'v1'}")
    out.mkdir(parents=True, exist_ok=True)
    written = []
    with tempfile.TemporaryDirectory() as tmp:
        run_protoc(root, protos, Path(tmp))
        for proto in protos:
            stem = proto.with_suffix("")
            for suffix in SUFFIXES:
                generated = Path(tmp) / f"{stem}{suffix}"
                target = out / f"{stem.name}{suffix}"
                target.write_text(rewrite(generated.read_text(), proto))
                written.append(target)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory")
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
