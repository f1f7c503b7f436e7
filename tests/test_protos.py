"""The kiln.v1 API: generated stubs are fresh, marked DO NOT EDIT, and keep proto3 ``optional``."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from kilnlm.proto import admin_pb2, generation_pb2

REPO = Path(__file__).resolve().parent.parent
STUBS = REPO / "kilnlm" / "proto"


def _generator():
    spec = importlib.util.spec_from_file_location("gen_protos", REPO / "protos" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_stubs_are_fresh(tmp_path):
    """Regenerating from protos/ gives byte-for-byte the stubs the package imports."""
    pytest.importorskip("grpc_tools")
    fresh = {p.name: p.read_text() for p in _generator().generate(tmp_path)}
    installed = {p.name: p.read_text() for p in STUBS.glob("*_pb2*.py*")}
    stale = sorted(set(installed) - set(fresh))
    assert not stale, f"stubs without a .proto: {stale}; delete them"
    for name, text in fresh.items():
        assert installed.get(name) == text, (
            f"kilnlm/proto/{name} is stale: run `python protos/generate.py` (or pip install -e .)"
        )


def test_every_stub_says_do_not_edit_and_names_its_source():
    for path in STUBS.glob("*_pb2*.py*"):
        first = path.read_text().splitlines()[0]
        assert first.startswith("# DO NOT EDIT: generated from protos/kiln/v1/"), path.name
        assert "protos/generate.py" in first


def test_stubs_import_siblings_from_our_package_only():
    """protoc writes `from kiln.v1 import ...`; the generator must point it inside kilnlm."""
    for path in STUBS.glob("*_pb2*.py"):
        text = path.read_text()
        assert "from kiln.v1 import" not in text and "import kiln.v1" not in text, path.name


def test_unset_sampling_fields_differ_from_zero():
    """proto3 optional: temperature 0 (greedy) must not read as "unset" (chat's 0.7 default)."""
    unset = generation_pb2.SamplingParams()
    zero = generation_pb2.SamplingParams(temperature=0.0, top_k=0, seed=0)
    decoded = generation_pb2.SamplingParams.FromString(zero.SerializeToString())
    assert not unset.HasField("temperature")
    for name in ("temperature", "top_k", "seed"):
        assert decoded.HasField(name)
    assert decoded.temperature == 0.0


def test_services_and_version_fields():
    generation = generation_pb2.DESCRIPTOR.services_by_name["Generation"]
    assert set(generation.methods_by_name) == {
        "Generate",
        "GenerateStream",
        "Chat",
        "Infill",
        "Score",
        "Reward",
        "GetModelInfo",
    }
    streaming = {m.name for m in generation.methods if m.server_streaming}
    assert streaming == {"GenerateStream", "Chat", "Infill"}
    admin = admin_pb2.DESCRIPTOR.services_by_name["Admin"]
    assert set(admin.methods_by_name) == {
        "ListCheckpoints",
        "Promote",
        "Register",
        "Rollback",
        "Status",
    }
    for name in ("GenerateRequest", "ChatRequest", "ScoreRequest"):
        fields = generation_pb2.DESCRIPTOR.message_types_by_name[name].fields_by_name
        assert fields["min_version"].number == 14 and fields["pin_version"].number == 15
