"""The manifest: what an export (or one rank's part of a training checkpoint) holds, so a copy
can be checked before it is trusted.

``manifest.json`` lists the sha256 and size of every other file, the format version and the
caller's fields (version, step, tokens_seen, heldout_loss, ...); it is written last, so its
presence means the export is complete. ``Manifest.content_sha256`` is the export's identity: it
covers the files and the fields but not when or by which kilnlm build it was written, so the same
weights exported twice are the same content (the registry and content-addressed export folders
key on it).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from kilnlm.checkpoint.errors import (
    CheckpointError,
    ChecksumError,
    IncompleteCheckpointError,
)

FORMAT = "kilnlm.checkpoint"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
CONFIG = "config.json"
WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
TOKENIZER = "tokenizer.json"
# Pickle-based formats: loading one can run arbitrary code, so we refuse them outright.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
PROVENANCE = ("created_unix", "kilnlm_version")
"""Manifest keys that say when and by what an export was written, not what it holds."""


@dataclass(frozen=True)
class FileEntry:
    sha256: str
    size: int


@dataclass
class Manifest:
    """What an export holds, so a copy can be checked before it is trusted."""

    files: dict[str, FileEntry]
    """Every file of the export but the manifest itself, by name relative to the directory."""
    fields: dict[str, Any] = field(default_factory=dict)
    """The caller's fields: version, step, tokens_seen, heldout_loss, ..."""
    hf_compatible: bool = True
    """False when the model uses options HF Llama cannot express (only kilnlm can load it)."""
    format_version: int = FORMAT_VERSION
    kilnlm_version: str = "unknown"
    created_unix: float = 0.0

    def __post_init__(self) -> None:
        self.files = {
            name: e if isinstance(e, FileEntry) else FileEntry(**e)
            for name, e in self.files.items()
        }
        for name in self.files:
            check_relative_name(name, MANIFEST)

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, **asdict(self)}

    def content_sha256(self) -> str:
        """The identity of what the export holds: equal for the same files and fields, whenever
        and by whichever kilnlm build they were written (``PROVENANCE`` is left out)."""
        content = {k: v for k, v in self.to_dict().items() if k not in PROVENANCE}
        canonical = json.dumps(content, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Manifest:
        if d.get("format") != FORMAT:
            raise CheckpointError(
                f"{MANIFEST} is not a kilnlm manifest (format={d.get('format')!r})"
            )
        version = d.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:  # before unknown keys trip us
            raise CheckpointError(
                f"manifest format_version {version!r} is newer than this kilnlm understands "
                f"({FORMAT_VERSION}); upgrade kilnlm to load this checkpoint"
            )
        return cls(**{k: v for k, v in d.items() if k != "format"})

    def check(self, root: Path, name: str) -> None:
        """Raise unless ``root/name`` is listed and matches its size and sha256."""
        entry = self.files.get(name)
        if entry is None:
            raise CheckpointError(
                f"{name} is not listed in {root / MANIFEST}, so it cannot be verified; re-export "
                "the checkpoint"
            )
        path = root / name
        if not path.is_file():
            raise IncompleteCheckpointError(
                f"{name} is listed in the manifest but missing from {root}: the copy is "
                "incomplete; copy the checkpoint again"
            )
        size = path.stat().st_size
        if size != entry.size:
            raise ChecksumError(
                name,
                f"{name} in {root} has {size} bytes, the manifest says {entry.size}: it is "
                "truncated or was modified after export; copy or export it again",
            )
        digest = sha256_file(path)
        if digest != entry.sha256:
            raise ChecksumError(
                name,
                f"{name} in {root} has sha256 {digest[:16]}…, the manifest says "
                f"{entry.sha256[:16]}…: it is corrupted or was modified after export; copy or "
                "export it again",
            )


def verify_manifest(path: str | os.PathLike[str]) -> Manifest:
    """Check every file listed in ``path/manifest.json``; return the manifest.

    Raises IncompleteCheckpointError when the manifest (written last) or a listed file is missing,
    ChecksumError naming the first file whose size or sha256 differs.
    """
    root = existing_dir(path)
    manifest = read_manifest(root)
    for name in sorted(manifest.files):
        manifest.check(root, name)
    return manifest


def read_manifest(path: str | os.PathLike[str]) -> Manifest:
    """The manifest without checking any file (cheap: for listing versions, not for loading)."""
    file = Path(path) / MANIFEST
    if not file.is_file():
        raise IncompleteCheckpointError(
            f"{Path(path)} has no {MANIFEST}: the export did not finish or the copy is "
            "incomplete (the manifest is written last); export or copy it again"
        )
    return parse_manifest(file, "export it again")


def parse_manifest(file: Path, hint: str) -> Manifest:
    """Parse one manifest file (an export's or a rank's); ``hint`` says what to do if it is bad.

    Raises CheckpointError for anything that is not a kilnlm manifest: invalid JSON, a JSON
    value that is not an object, missing or mistyped keys.
    """
    try:
        d = json.loads(file.read_text())
        if not isinstance(d, dict):
            raise TypeError(f"it holds a JSON {type(d).__name__}, not an object")
        files = d.get("files")
        if not isinstance(files, dict) or not all(isinstance(e, dict) for e in files.values()):
            raise TypeError("'files' is not an object of {sha256, size} objects")
        return Manifest.from_dict(d)
    except CheckpointError:
        raise
    except (ValueError, TypeError, KeyError) as e:
        raise CheckpointError(f"{file} is not a valid manifest ({e}); {hint}") from e


def sha256_file(path: Path) -> str:
    """The hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def check_relative_name(name: str, source: str) -> None:
    """Refuse names that would reach outside the checkpoint directory (``../``, absolute)."""
    p = PurePosixPath(name)
    if not name or p.is_absolute() or ".." in p.parts or "\\" in name:
        raise CheckpointError(f"{source} names the file {name!r}, which is outside the checkpoint")


def existing_dir(path: str | os.PathLike[str]) -> Path:
    """``path`` as a Path; FileNotFoundError (an environment problem, not a bad checkpoint) if it
    is not a directory."""
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"checkpoint directory {root} does not exist")
    return root
