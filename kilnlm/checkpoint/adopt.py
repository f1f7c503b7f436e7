"""Adopt a plain Hugging Face Llama directory: compute its manifest once, verify it ever after.

A directory from the Hub (or from transformers' ``save_pretrained``) has no ``manifest.json``.
Serving and the registry trust a checkpoint only through its manifest (a torn or modified copy
must never serve), so the first time such a directory is registered or served its manifest is
computed from the files as they are then and written beside them, atomically (a temporary file
renamed into place: two replicas adopting at once write the same bytes, and a reader never sees
half a manifest). From then on it is a checkpoint like our exports: every later load verifies
the checksums, and a file changed afterwards is refused.

What is adopted must look like a model: a ``config.json`` that is not ours (ours without a
manifest is an interrupted export, refused as incomplete) and safetensors weights. Where the
directory cannot be written (a read-only mount), the manifest is kept in memory for this load
only, and the caller is told so through ``fields["written"]``.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

from kilnlm.checkpoint.errors import IncompleteCheckpointError
from kilnlm.checkpoint.manifest import (
    CONFIG,
    MANIFEST,
    WEIGHTS,
    WEIGHTS_INDEX,
    FileEntry,
    Manifest,
    existing_dir,
    read_manifest,
    sha256_file,
    verify_manifest,
)

SOURCE = "huggingface"


def is_foreign(root: Path) -> bool:
    """A model directory kilnlm did not write (no manifest, a config.json without our key)."""
    config = root / CONFIG
    if (root / MANIFEST).is_file() or not config.is_file():
        return False
    try:
        return "kilnlm" not in json.loads(config.read_text())
    except ValueError:
        return False


def ensure_manifest(path: str | os.PathLike[str], verify: bool = True) -> Manifest:
    """The manifest of ``path``: checked (``verify``) or read when it has one, computed (and
    written) when it is a foreign Hugging Face directory. IncompleteCheckpointError otherwise."""
    root = existing_dir(path)
    if not is_foreign(root):  # ours (or already adopted)
        return verify_manifest(root) if verify else read_manifest(root)
    if not ((root / WEIGHTS).is_file() or (root / WEIGHTS_INDEX).is_file()):
        raise IncompleteCheckpointError(
            f"{root} has a config.json but no {WEIGHTS}: not a model directory kilnlm can serve "
            "(pickle weights must be converted to safetensors first)"
        )
    return adopt(root)


def check_servable(path: str | os.PathLike[str]) -> Manifest:
    """What a replica checks before it loads, run where the user is (``kiln serve``), so a bad
    directory is one line at the CLI instead of a replica's traceback: the manifest (adopting a
    Hugging Face directory), a tokenizer, and a config kilnlm can build."""
    from kilnlm.checkpoint.hf import config_from_hf
    from kilnlm.checkpoint.load import load_tokenizer

    manifest = ensure_manifest(path)
    if load_tokenizer(path, verify=False) is None:
        raise IncompleteCheckpointError(
            f"{path} has no tokenizer.json; serving needs the model's tokenizer beside it"
        )
    config_from_hf(json.loads((Path(path) / CONFIG).read_text()))  # UnsupportedConfigError
    return manifest


def adopt(root: Path) -> Manifest:
    """Compute the manifest of every file under ``root`` and write it there if possible."""
    files = {
        p.relative_to(root).as_posix(): FileEntry(sha256_file(p), p.stat().st_size)
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != MANIFEST and not p.name.startswith(".")
    }
    fields = {"version": 1, "source": SOURCE}  # no time: the same files, the same identity
    manifest = Manifest(files=files, fields=fields, created_unix=time.time())
    try:
        _write_atomically(root / MANIFEST, json.dumps(manifest.to_dict(), indent=2) + "\n")
        manifest.fields["written"] = True
    except OSError:  # a read-only directory: verified for this load only
        manifest.fields["written"] = False
    return manifest


def _write_atomically(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".manifest-", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


__all__ = ["SOURCE", "adopt", "check_servable", "ensure_manifest", "is_foreign"]
