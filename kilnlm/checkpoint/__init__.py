"""Checkpoints on disk: a Hugging Face Llama directory that kilnlm can trust.

An export is one directory::

    model.safetensors   weights under HF Llama names (tied embeddings stored once, as HF does)
    config.json         HF Llama keys, plus a "kilnlm" key with the full ModelConfig
    tokenizer.json      when a tokenizer was given
    manifest.json       written last: sha256 and size of every file, format version, and the
                        caller's fields (version, step, tokens_seen, heldout_loss, ...)

Why this shape: transformers (and everything built on it) loads the directory as it is, and
kilnlm loads any HF Llama directory back, so our logits can be checked against an independent
implementation.

Why the manifest and the atomic write: the orchestrator hot-swaps checkpoints into live replicas,
so a half-written or corrupted export must be refused, never served; a copy is checked against the
manifest's checksums before any weight is used.

The package is split along its jobs, and every public name is re-exported here
(``from kilnlm import checkpoint; checkpoint.load(...)``):

- ``errors``    ``CheckpointError`` and its subclasses: the checkpoint itself is bad
- ``manifest``  the manifest: checksums, verification, parsing, content identity
- ``hf``        the HF Llama mapping: config.json keys (RoPE scaling included), tensor names
- ``export``    model / state dict -> directory, atomically
- ``load``      directory -> model / state dict, verified, never unpickled
- ``adopt``     a plain Hugging Face directory gets its manifest when first registered or served
- ``remote``    object storage (s3://, gs://): upload manifest last, fetch into a verified cache
"""

from kilnlm.checkpoint import remote
from kilnlm.checkpoint.adopt import check_servable, ensure_manifest
from kilnlm.checkpoint.errors import (
    CheckpointError,
    ChecksumError,
    IncompatibleWeightsError,
    IncompleteCheckpointError,
    ShapeMismatchError,
    TokenizerMismatchError,
    UnsafeFormatError,
    UnsupportedConfigError,
)
from kilnlm.checkpoint.export import export_content_addressed, export_state_dict, save_pretrained
from kilnlm.checkpoint.hf import (
    SUPPORTED_ROPE_TYPES,
    config_from_hf,
    config_to_hf,
    from_hf_state_dict,
    hf_compatible,
    hf_incompatibilities,
    to_hf_state_dict,
)
from kilnlm.checkpoint.load import (
    load,
    load_state_dict_into,
    load_tokenizer,
    read_state_dict,
)
from kilnlm.checkpoint.manifest import (
    CONFIG,
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    PICKLE_SUFFIXES,
    TOKENIZER,
    WEIGHTS,
    WEIGHTS_INDEX,
    FileEntry,
    Manifest,
    parse_manifest,
    read_manifest,
    sha256_file,
    verify_manifest,
)

__all__ = [
    "CONFIG",
    "FORMAT",
    "FORMAT_VERSION",
    "MANIFEST",
    "PICKLE_SUFFIXES",
    "SUPPORTED_ROPE_TYPES",
    "TOKENIZER",
    "WEIGHTS",
    "WEIGHTS_INDEX",
    "CheckpointError",
    "ChecksumError",
    "FileEntry",
    "IncompatibleWeightsError",
    "IncompleteCheckpointError",
    "Manifest",
    "ShapeMismatchError",
    "TokenizerMismatchError",
    "UnsafeFormatError",
    "UnsupportedConfigError",
    "check_servable",
    "config_from_hf",
    "config_to_hf",
    "ensure_manifest",
    "export_content_addressed",
    "export_state_dict",
    "from_hf_state_dict",
    "hf_compatible",
    "hf_incompatibilities",
    "load",
    "load_state_dict_into",
    "load_tokenizer",
    "parse_manifest",
    "read_manifest",
    "read_state_dict",
    "remote",
    "save_pretrained",
    "sha256_file",
    "to_hf_state_dict",
    "verify_manifest",
]
