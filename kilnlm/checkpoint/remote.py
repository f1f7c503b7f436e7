"""Checkpoints in object storage (``s3://``, ``gs://``, any URI pyarrow opens): upload, fetch, cache.

Why pyarrow.fs and not fsspec: it is installed already (``ray[data]`` needs it), Ray Train's own
``storage_path`` goes through it, so a URI the trainer writes is read here with the same parsing,
the same credentials (``AWS_*`` variables, an instance role, ``GOOGLE_APPLICATION_CREDENTIALS``)
and the same endpoint override (``AWS_ENDPOINT_URL``); fsspec would need s3fs/gcsfs besides.

Object storage has no rename and no directories, so the export's rules are restated for it:

- **Upload** (``upload_export``): every file first, ``manifest.json`` last. A reader treats a
  folder without a manifest as not there, so a crashed upload is never read. Export folders are
  content-addressed: a folder whose manifest exists is never written again.
- **Fetch** (``fetch``): the replicas and the gate load from a local directory. The manifest is
  read first; its ``content_sha256`` names the cache folder, so one checkpoint is downloaded once
  per node whatever URI it came under. The files go into a temporary folder, every checksum is
  verified, and only then is it renamed into place: a torn or corrupted copy is never under the
  cache name. An exclusive file lock per content hash makes a second process (another replica on
  the node) wait for the first download and reuse it.
- **Errors**: a bad object (wrong size or sha256, a missing file or manifest) is a
  ``CheckpointError`` (reject it); an unreachable bucket, refused credentials or a timeout is a
  ``SwapEnvironmentError`` (retry later): the checkpoint may be fine.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kilnlm.checkpoint.errors import CheckpointError, IncompleteCheckpointError
from kilnlm.checkpoint.manifest import MANIFEST, Manifest, verify_manifest
from kilnlm.errors import SwapEnvironmentError

CACHE_ENV = "KILN_CHECKPOINT_CACHE"
"""Environment variable naming the node's checkpoint cache (default ~/.cache/kilnlm/checkpoints)."""
STORAGE_ENV_PREFIXES = ("AWS_", "GOOGLE_", "GCS_", "AZURE_", "KILN_CHECKPOINT_CACHE")
"""Variables that configure object storage, forwarded to Ray workers (``storage_env``)."""


def is_remote(uri: str | os.PathLike[str]) -> bool:
    """True for an object-store URI (``s3://``, ``gs://``, ...); False for a path or ``file://``."""
    uri = str(uri)
    return "://" in uri and not uri.startswith("file://")


SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AZURE_STORAGE_KEY")
"""Never sent to a cluster this process joins (a runtime env is visible to every job there):
its nodes authenticate with their own IAM role or service account."""


def storage_env(environ: dict[str, str] | None = None, secrets: bool = True) -> dict[str, str]:
    """The object-storage settings of this process, to put in a Ray runtime env: workers started
    before the variables were set (a local cluster) would otherwise reach another endpoint.
    ``secrets=False`` leaves out the keys (``SECRET_ENV``) for a shared cluster."""
    environ = dict(os.environ if environ is None else environ)
    return {
        k: v
        for k, v in environ.items()
        if k.startswith(STORAGE_ENV_PREFIXES) and (secrets or k not in SECRET_ENV)
    }


def cache_root() -> Path:
    """This node's checkpoint cache (``$KILN_CHECKPOINT_CACHE``, else ~/.cache/kilnlm/checkpoints)."""
    default = Path.home() / ".cache" / "kilnlm" / "checkpoints"
    return Path(os.environ.get(CACHE_ENV) or default)


@contextlib.contextmanager
def reaching(uri: str) -> Iterator[None]:
    """Turn storage I/O failures into ``SwapEnvironmentError`` (retryable), naming the URI."""
    try:
        yield
    except CheckpointError:
        raise
    except (OSError, ValueError) as e:  # pyarrow: OSError for network/auth, ValueError for URIs
        raise SwapEnvironmentError(
            f"cannot reach {uri} ({e}); check the bucket name, the credentials (AWS_* / "
            "GOOGLE_APPLICATION_CREDENTIALS / the node's role) and AWS_ENDPOINT_URL, then retry"
        ) from e


def filesystem(uri: str) -> tuple[Any, str]:
    """(pyarrow filesystem, path inside it) for ``uri``."""
    import pyarrow.fs

    with reaching(uri):
        return pyarrow.fs.FileSystem.from_uri(uri)


def _join(uri: str, name: str) -> str:
    return f"{uri.rstrip('/')}/{name}"


# --------------------------------------------------------------------------------------------
# Small objects: manifests, the registry


def exists(uri: str) -> bool:
    import pyarrow.fs

    fs, path = filesystem(uri)
    with reaching(uri):
        return fs.get_file_info(path).type != pyarrow.fs.FileType.NotFound


def read_bytes(uri: str) -> bytes | None:
    """The object's bytes, or None if there is none."""
    if not exists(uri):
        return None
    fs, path = filesystem(uri)
    with reaching(uri), fs.open_input_stream(path) as f:
        return f.read()


def write_bytes(uri: str, data: bytes) -> None:
    """Put one object. A single PUT is atomic on S3 and GCS: readers see the old object or the new
    one, never a part (so the registry needs no rename there)."""
    fs, path = filesystem(uri)
    with reaching(uri):
        parent = path.rsplit("/", 1)[0]
        fs.create_dir(parent, recursive=True)  # a no-op on buckets; real on local/HDFS
        with fs.open_output_stream(path) as f:
            f.write(data)


def read_remote_manifest(uri: str) -> Manifest:
    """The manifest of the export at ``uri`` (IncompleteCheckpointError if there is none)."""
    return _remote_manifest(uri)[0]


def _remote_manifest(uri: str) -> tuple[Manifest, bytes]:
    data = read_bytes(_join(uri, MANIFEST))
    if data is None:
        raise IncompleteCheckpointError(
            f"{uri} has no {MANIFEST}: the upload did not finish or this is not an export (the "
            "manifest is uploaded last); export it again"
        )
    try:
        return Manifest.from_dict(json.loads(data)), data
    except (ValueError, TypeError, KeyError) as e:
        raise CheckpointError(
            f"{uri}/{MANIFEST} is not a valid manifest ({e}); export again"
        ) from e


# --------------------------------------------------------------------------------------------
# Upload


def upload_export(local_dir: str | os.PathLike[str], uri: str) -> bool:
    """Upload the export ``local_dir`` to ``uri``: every file, then the manifest. Returns False
    (and writes nothing) when ``uri`` already has a manifest: export folders are immutable."""
    import pyarrow.fs

    local = Path(local_dir)
    verify_manifest(local)  # never publish a copy that is already torn
    if exists(_join(uri, MANIFEST)):
        return False
    files = sorted(p for p in local.rglob("*") if p.is_file() and p.name != MANIFEST)
    fs, root = filesystem(uri)
    with reaching(uri):
        for p in [*files, local / MANIFEST]:
            target = f"{root.rstrip('/')}/{p.relative_to(local).as_posix()}"
            pyarrow.fs.copy_files(str(p), target, destination_filesystem=fs)
    return True


def delete_export(uri: str) -> None:
    """Delete an export folder: its manifest first, so a reader never sees a manifest without
    its files."""
    fs, root = filesystem(uri)
    with reaching(uri):
        if exists(_join(uri, MANIFEST)):
            fs.delete_file(f"{root.rstrip('/')}/{MANIFEST}")
        fs.delete_dir_contents(root, missing_dir_ok=True)


# --------------------------------------------------------------------------------------------
# Fetch into the node's cache


@dataclass(frozen=True)
class Fetched:
    path: Path
    """The verified local copy (under the cache, named by the content hash)."""
    downloaded: bool
    """False: another fetch on this node had downloaded it already."""


def local_dir(uri: str | os.PathLike[str], cache: str | os.PathLike[str] | None = None) -> str:
    """A local directory holding ``uri``: the path itself for a local one, else the verified
    cached copy (downloaded first if needed). What the gate and the replicas load."""
    uri = str(uri)
    if not is_remote(uri):
        return os.path.abspath(uri.removeprefix("file://"))
    return str(fetch(uri, cache).path)


DOWNLOAD_CHUNK = 16 << 20
"""Bytes per ranged GET when an export is downloaded. pyarrow's default (1 MiB) makes 500
requests for a 500 MB safetensors file; each costs a round trip on S3/GCS, and on the S3 server
the tests and bench use (moto) a 100M export's cold restore took 138 s against 10.6 s with 16
MiB (docs/benchmarks.md). 16 MiB keeps the buffer per thread small."""


def fetch(uri: str, cache: str | os.PathLike[str] | None = None) -> Fetched:
    """Download the export at ``uri`` into the cache (once per content), verified.

    Raises CheckpointError (a subclass) when an object is missing or does not match the manifest,
    SwapEnvironmentError when the storage cannot be reached.
    """
    manifest, raw = _remote_manifest(uri)
    key = manifest.content_sha256()
    root = Path(cache) if cache is not None else cache_root()
    root.mkdir(parents=True, exist_ok=True)
    final = root / key
    with _locked(root / f".{key}.lock"):
        if (final / MANIFEST).is_file():
            return Fetched(final, downloaded=False)
        tmp = root / f".{key}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            _download(uri, manifest, raw, tmp)
            os.rename(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return Fetched(final, downloaded=True)


@contextlib.contextmanager
def _locked(lock_file: Path) -> Iterator[None]:
    """An exclusive lock across processes of this node (released if the holder dies)."""
    with lock_file.open("a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _download(uri: str, manifest: Manifest, raw: bytes, tmp: Path) -> None:
    """Every listed file and the manifest into ``tmp``, then every checksum checked."""
    import pyarrow.fs

    fs, root = filesystem(uri)
    local = pyarrow.fs.LocalFileSystem()
    tmp.mkdir(parents=True)
    for name in sorted(manifest.files):  # names were checked to stay inside the folder
        source = f"{root.rstrip('/')}/{name}"
        (tmp / name).parent.mkdir(parents=True, exist_ok=True)
        with reaching(uri):
            if fs.get_file_info(source).type == pyarrow.fs.FileType.NotFound:
                raise IncompleteCheckpointError(
                    f"{uri} lists {name} in its manifest but has no such object; export again"
                )
            pyarrow.fs.copy_files(
                source,
                str(tmp / name),
                source_filesystem=fs,
                destination_filesystem=local,
                chunk_size=DOWNLOAD_CHUNK,
            )
    (tmp / MANIFEST).write_bytes(raw)  # the object as uploaded, not a re-serialisation
    verify_manifest(tmp)  # ChecksumError names the object that does not match


__all__ = [
    "CACHE_ENV",
    "Fetched",
    "cache_root",
    "delete_export",
    "exists",
    "fetch",
    "is_remote",
    "local_dir",
    "read_bytes",
    "read_remote_manifest",
    "storage_env",
    "upload_export",
    "write_bytes",
]
