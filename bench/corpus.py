"""Corpus building side by side: ``build_corpus`` in one process vs ``kiln corpus`` on Ray Data
with 1 and 2 workers, on the same input (the embedded default corpus, capped).

    python bench/corpus.py                     # 6 MB of the stdlib (the main job's corpus)
    python bench/corpus.py --max-bytes 20000000 --workers 1,2

documents/s counts documents read (before filtering), tokens/s token ids written; both over the
whole build, reading to manifest. Each Ray run starts from warm workers (a small build first),
so the figures leave out worker start-up (importing torch), which a long build amortises. Every
build must produce the same files; the script checks it and says so.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import ray
from _common import machine_note

from kilnlm.cli.corpus import corpus_summary
from kilnlm.cluster.corpus import build_corpus_ray
from kilnlm.data import CorpusConfig, build_corpus
from kilnlm.shards import CorpusManifest


def timed(build: Any, out: Path, label: str, workers: int) -> dict[str, Any]:
    start = time.perf_counter()
    manifest = build(out)
    row = corpus_summary(manifest, str(out), time.perf_counter() - start, workers)
    return {"builder": label, **row}


def same_files(a: Path, b: Path) -> bool:
    manifest = CorpusManifest.load(a)
    names = ["tokenizer.json"] + [s.file for x in manifest.splits.values() for s in x.shards]
    return all(filecmp.cmp(a / n, b / n, shallow=False) for n in names)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-bytes", type=int, default=6_000_000)
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--workers", default="1,2", help="comma-separated Ray worker counts")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    cfg = CorpusConfig(max_bytes=args.max_bytes)
    counts = [int(w) for w in args.workers.split(",")]
    ray.init(num_cpus=max(counts) + 1, include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        warm = CorpusConfig(max_bytes=100_000)
        build_corpus_ray(warm, root / "warm", 300, workers=max(counts), progress=False)
        rows = [
            timed(
                lambda out: build_corpus(cfg, out, args.vocab_size, progress=False),
                root / "one",
                "build_corpus (one process)",
                1,
            )
        ]
        for n in counts:
            out = root / f"ray{n}"
            rows.append(
                timed(
                    lambda out, n=n: build_corpus_ray(cfg, out, args.vocab_size, n, False),
                    out,
                    f"kiln corpus (Ray Data, {n} workers)",
                    n,
                )
            )
            rows[-1]["identical_to_one_process"] = same_files(root / "one", out)
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(machine_note())
    print(f"input: {rows[0]['documents']} documents, {args.max_bytes} bytes of the stdlib")
    print("| builder | seconds | documents/s | tokens/s | read / clean / tokenizer / encode s |")
    print("|---|---|---|---|---|")
    for r in rows:
        stages = " / ".join(f"{r['stage_seconds'][k]:.2f}" for k in r["stage_seconds"])
        print(
            f"| {r['builder']} | {r['seconds']:.1f} | {r['documents_per_s']:.0f} | "
            f"{r['tokens_per_s']:.0f} | {stages} |"
        )
    same = all(r.get("identical_to_one_process", True) for r in rows)
    print(f"all builds byte-identical: {same}  (cpus: {os.cpu_count()})")


if __name__ == "__main__":
    main()
