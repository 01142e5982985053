"""Interleaved latency measurement of runners: the timing primitive ``edgekit bench`` and
``--precision auto`` share.

Every row is warmed up, then measured in interleaved rounds (row A, row B, ..., row A, ...) so drift
on a noisy machine hits all rows alike; each round's calls are kept apart so a spread over the
round medians can be reported.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import numpy as np

from edgekit.backends.base import Runner
from edgekit.progress import progress


@dataclass
class Row:
    name: str
    runner: Runner
    size_bytes: int
    lat: Dict[int, List[float]] = field(default_factory=dict)  # batch -> per-call seconds
    result: dict = field(default_factory=dict)
    rounds: Dict[int, List[List[float]]] = field(default_factory=dict)  # batch -> per-call seconds, per round

    def start_round(self, batch: int) -> None:
        self.lat.setdefault(batch, [])
        self.rounds.setdefault(batch, []).append([])

    def record(self, batch: int, seconds: float) -> None:
        self.lat[batch].append(seconds)
        self.rounds[batch][-1].append(seconds)

    def round_fps(self, batch: int = 1) -> List[float]:
        """Images/s from each round's median latency."""
        return [batch / float(np.median(r)) for r in self.rounds.get(batch, []) if r]


def time_rows(rows: List[Row], batches: List[int], rounds: int, iters: int, warmup: int, show_progress: bool,
              log: Optional[Callable[[str], None]] = None):
    rng = np.random.default_rng(0)
    inputs = {b: rng.standard_normal((b, *rows[0].runner.input_shape)).astype(np.float32) for b in batches}
    per_round = 0.0  # seconds one round should take, from the warm-up calls (median: the first compiles)
    for r in rows:
        for b in batches:
            calls = []
            for _ in range(max(min(2, warmup), warmup // b)):  # a large batch warms up in fewer calls
                t0 = time.perf_counter()
                r.runner.infer(inputs[b])
                calls.append(time.perf_counter() - t0)
            per_round += float(np.median(calls)) * max(1, iters // b) if calls else 0.0
            r.lat[b] = []
            r.rounds[b] = []
    if log:
        log(f"timing {len(rows)} row(s) in {rounds} interleaved rounds x {iters} calls, batch "
            f"{','.join(map(str, batches))} (about {per_round * rounds:.0f} s)")
    with progress(total=rounds * len(rows) * len(batches), desc="timing", enabled=show_progress, unit="run") as bar:
        for k in range(rounds):
            if log and bar.disable:  # no bar on this stderr: one line per round instead
                log(f"timing round {k + 1}/{rounds}")
            for b in batches:
                for r in rows:  # interleaved: each round visits every row
                    bar.set_description(f"timing round {k + 1}/{rounds}: {r.name} b{b}", refresh=False)
                    r.start_round(b)
                    n = max(1, iters // b)
                    for _ in range(n):
                        t0 = time.perf_counter()
                        r.runner.infer(inputs[b])
                        r.record(b, time.perf_counter() - t0)
                    bar.update(1)
