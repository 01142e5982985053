"""Is the machine too busy for the timing to be believed, and what the bench does about it.

A ratio measured while other processes compete for the cores is not the ratio a user gets on a quiet
machine (seen on the 2-core machine: cpu-fused "1.09x, within noise" under load, 1.79x rerun quietly).
Two signals say so, and the rule (``judge_machine``, pure: the load and the round figures come in as
data) is:

* **load**: the 1-minute load average exceeds ``max(logical CPUs, bench threads) + LOAD_MARGIN``.
  The bench's own threads account for up to ``threads`` runnable tasks, and other work that fits on
  the cores the bench leaves free does not compete with it; anything above that does.
* **spread**: the rounds disagree. A row's round spread is (max - min) / median of its per-round
  batch-1 FPS; the machine's is the median of that over the rows (one inherently jittery row does
  not make the machine busy). Above ``SPREAD_SETTLED`` the spread is *unsettled*. One round gives
  no spread to judge.

When either says busy the bench says so in one line on stderr (and in the JSON's ``machine_state``).
If the spread is unsettled it then times further interleaved rounds, one at a time, until the last
``--rounds`` rounds have a settled spread or ``--settle-time`` seconds have passed (at most
``MAX_EXTRA_ROUNDS`` rounds). Settled: the figures are those last ``--rounds`` rounds, the earlier
ones are dropped (counted in the JSON). Not settled: every round is kept, so the wide spread shows,
and the caption says the figures were taken on a busy machine.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from statistics import median
from typing import List, Optional, Sequence

LOAD_MARGIN = 0.5
SPREAD_SETTLED = 0.20
DEFAULT_SETTLE_S = 60.0
MAX_EXTRA_ROUNDS = 50
RULE = (f"busy when the 1-minute load average > max(logical CPUs, threads) + {LOAD_MARGIN}, or when the "
        f"median over rows of (max-min)/median of the per-round batch-1 FPS > {SPREAD_SETTLED:.2f}")


def relative_spread(per_round: Sequence[float]) -> Optional[float]:
    """(max - min) / median of one row's per-round figures; None from fewer than two rounds."""
    v = [float(x) for x in per_round]
    if len(v) < 2:
        return None
    med = float(median(v))
    return (max(v) - min(v)) / med if med > 0 else None


@dataclass(frozen=True)
class MachineState:
    busy: bool
    by_load: bool
    by_spread: bool
    load_average_1min: Optional[float]
    logical_cpus: int
    threads: Optional[int]
    round_spread: Optional[float]  # the median row's relative spread; None: one round

    @property
    def spread_unsettled(self) -> bool:
        return self.by_spread

    def reasons(self) -> str:
        parts = []
        if self.by_load:
            parts.append(f"load average {self.load_average_1min:.1f} on {self.logical_cpus} CPUs "
                         f"({self.threads or self.logical_cpus} bench threads)")
        if self.by_spread:
            parts.append(f"rounds differ by {self.round_spread:.0%} (settled: <= {SPREAD_SETTLED:.0%})")
        return ", ".join(parts)

    def to_json(self) -> dict:
        return {**asdict(self), "spread_settled_limit": SPREAD_SETTLED, "rule": RULE}


def judge_machine(load_1min: Optional[float], logical_cpus: int, threads: Optional[int],
                  round_fps: Sequence[Sequence[float]]) -> MachineState:
    """The busy-machine rule (module docstring) on given figures: the 1-minute load average (None:
    unknown), the machine's logical CPUs, the bench's threads, and each row's per-round batch-1 FPS."""
    cpus = max(1, int(logical_cpus or 1))
    by_load = load_1min is not None and load_1min > max(cpus, threads or cpus) + LOAD_MARGIN
    spreads: List[float] = [s for s in (relative_spread(r) for r in round_fps) if s is not None]
    spread = float(median(spreads)) if spreads else None
    by_spread = spread is not None and spread > SPREAD_SETTLED
    return MachineState(busy=by_load or by_spread, by_load=by_load, by_spread=by_spread,
                        load_average_1min=load_1min, logical_cpus=cpus, threads=threads, round_spread=spread)
