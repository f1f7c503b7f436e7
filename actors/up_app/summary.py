"""The closing summary of ``kiln up``: every version, what the gate said, the swaps, the requests
served and failed, and whether the model beat the n-gram baseline; and when the run has settled."""

from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any

from kilnlm.actors.up_app.watch import ClientLoad, PromotionWatcher
from kilnlm.energy import EnergyReport


@dataclass
class VersionRow:
    """One registered checkpoint in the summary."""

    version: int
    step: int | None
    tokens_seen: int | None
    status: str
    perplexity: float | None
    bits_per_byte: float | None
    reason: str
    swap_s: float | None
    """Stage sent → every replica committed (its promotion's swap)."""
    registered_to_serving_s: float | None


@dataclass
class UpSummary:
    """What ``kiln up`` reports at the end (and writes to ``<run>/up-summary.json``)."""

    run_dir: str
    address: str
    versions: list[VersionRow]
    promoted: list[int]
    """Versions promoted, in the order they were promoted."""
    rejected: list[int]
    requests_served: int
    requests_failed: int
    failures: dict[str, int]
    """Failed requests by gRPC status."""
    requests_by_version: dict[int, int]
    """Served requests by the version that produced them."""
    requests_across_swaps: int
    """Served requests that were in flight while a swap ran (started before it ended and
    ended after it started)."""
    generations: list[dict[str, Any]]
    train_s: float
    total_s: float
    settled: bool
    """Every checkpoint reached a final state before the summary (false: settle_timeout_s)."""
    training_error: str | None = None
    resumed_from: int = 0
    """The checkpoint step the last group of trainers resumed from: 0 when training ran through,
    > 0 after a worker-group restart (a worker or its node lost; FailureConfig max_failures)."""
    ngram: dict[str, Any] | None = None
    """The best Kneser-Ney baseline on the gate's held-out tokens: order, perplexity,
    bits_per_byte (None: not computed)."""
    energy: dict[str, Any] | None = None
    """``train`` and ``serving`` EnergyReports (kilnlm/energy.py): kWh, CO2, source, estimated;
    serving's per 1,000 generated tokens."""

    @property
    def perplexity_falling(self) -> bool:
        """Each promotion's held-out perplexity is below the previous one's."""
        by_version = {r.version: r.perplexity for r in self.versions}
        ppl = [by_version[v] for v in self.promoted]
        return all(p is not None for p in ppl) and all(b < a for a, b in itertools.pairwise(ppl))

    @property
    def beats_ngram(self) -> bool | None:
        """The last promoted version's held-out perplexity is below the n-gram baseline's
        (None when there is no baseline or nothing was promoted)."""
        ppl = {r.version: r.perplexity for r in self.versions}
        final = ppl.get(self.promoted[-1]) if self.promoted else None
        if self.ngram is None or final is None:
            return None
        return final < self.ngram["perplexity"]

    @property
    def ok(self) -> bool:
        return self.training_error is None and bool(self.promoted) and self.requests_failed == 0

    def to_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "perplexity_falling": self.perplexity_falling,
            "beats_ngram": self.beats_ngram,
        }

    def format(self) -> str:
        lines = [
            f"kiln up: summary ({self.total_s:.0f} s in all, training {self.train_s:.0f} s)",
            f"  run       {self.run_dir}",
            "  version  step   status     held-out ppl  bits/byte  swap s  registered→serving s",
        ]
        for r in self.versions:
            lines.append(
                f"  {r.version:>7}  {_num(r.step, 'd'):>5}  {r.status:<9}  {_num(r.perplexity, '.2f'):>12}"
                f"  {_num(r.bits_per_byte, '.3f'):>9}  {_num(r.swap_s, '.2f'):>6}"
                f"  {_num(r.registered_to_serving_s, '.1f'):>20}"
                + (f"  ({r.reason})" if r.status == "rejected" else "")
            )
        if self.ngram is not None:
            name = f"{self.ngram['order']}-gram KN"
            lines.append(
                f"  {'baseline':>7}  {'':>5}  {name:<9}  {self.ngram['perplexity']:>12.2f}"
                f"  {self.ngram['bits_per_byte']:>9.3f}  (count n-gram, same held-out tokens)"
            )
        trend = "falling" if self.perplexity_falling else "NOT falling"
        trend += " across them"
        if self.beats_ngram is not None:
            verdict = "beats" if self.beats_ngram else "does NOT beat"
            trend += f"; the last {verdict} the n-gram baseline"
        lines += [
            f"  promoted  {self.promoted or 'none'} (held-out perplexity {trend})",
            f"  rejected  {self.rejected or 'none'}",
            f"  requests  {self.requests_served} served, {self.requests_failed} failed"
            + (f" {dict(self.failures)}" if self.failures else "")
            + f"; in flight during a swap: {self.requests_across_swaps}; by version "
            + (", ".join(f"v{v}: {n}" for v, n in sorted(self.requests_by_version.items())) or "-"),
        ]
        lines += _energy_lines(self.energy)
        if not self.settled:
            lines.append("  note      the last checkpoints were still being validated or swapped")
        if self.resumed_from:
            lines.append(
                f"  training  restarted, resumed from the checkpoint of step {self.resumed_from}"
            )
        if self.training_error:
            lines.append(f"  training  FAILED: {self.training_error}")
        return "\n".join(lines)


def _energy_lines(energy: dict[str, Any] | None) -> list[str]:
    if not energy:
        return []
    return [
        f"  energy    {what:<8}  {EnergyReport(**energy[what]).format()}"
        for what in ("train", "serving")
        if energy.get(what)
    ]


def _num(value: float | int | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def summarize(
    status: Any, load: ClientLoad | None, watcher: PromotionWatcher, **fields: Any
) -> UpSummary:
    """The summary from the orchestrator's final status and the load's request records."""
    promotions = [
        s for s in status.swaps if s.outcome == "ok" and s.kind in ("promote", "rollback")
    ]
    swap_of = {s.version: s for s in promotions}
    rows = [_row(r, swap_of.get(r.version)) for r in status.checkpoints]
    requests = [r for r in (load.requests if load else []) if r.end_unix]
    served = [r for r in requests if not r.error]
    windows = [(s.started_unix, s.finished_unix) for s in status.swaps if s.finished_unix]
    return UpSummary(
        versions=rows,
        promoted=[s.version for s in promotions],
        rejected=[r.version for r in rows if r.status == "rejected"],
        requests_served=len(served),
        requests_failed=len(requests) - len(served),
        failures=dict(Counter(r.error for r in requests if r.error)),
        requests_by_version=dict(sorted(Counter(r.version for r in served).items())),
        requests_across_swaps=sum(
            any(r.start_unix < end and r.end_unix > start for start, end in windows) for r in served
        ),
        generations=[asdict(p) for p in watcher.promotions],
        **fields,
    )


def _row(record: Any, swap: Any) -> VersionRow:
    v = record.validation
    return VersionRow(
        version=record.version,
        step=record.step,
        tokens_seen=record.tokens_seen,
        status=record.status,
        perplexity=None if v is None else v.perplexity,
        bits_per_byte=None if v is None else v.bits_per_byte,
        reason=record.reason,
        swap_s=None if swap is None else swap.seconds,
        registered_to_serving_s=None if swap is None else swap.registered_to_serving_s,
    )


def is_settled(status: Any) -> bool:
    """Nothing left to do: no checkpoint waits for the gate, no swap runs, and the newest
    checkpoint that passed is promoted (or its swap ended in failure, so nothing will follow)."""
    if status.swapping_version is not None:
        return False
    if any(r.status in ("registered", "validating") for r in status.checkpoints):
        return False
    passed = [
        r.version for r in status.checkpoints if r.validation is not None and r.status != "rejected"
    ]
    if not passed or max(passed) == status.promoted_version:
        return True
    newest = max(passed)
    return any(s.version == newest and s.outcome not in ("ok", "running") for s in status.swaps)
