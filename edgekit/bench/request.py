"""What ``edgekit bench`` is asked to measure: built once by the command from its options and passed
down whole (it used to travel as 18 positional arguments)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

from edgekit.bench.busy import DEFAULT_SETTLE_S

DEFAULT_CPU_BATCHES = (1, 8)


@dataclass(frozen=True)
class BenchRequest:
    models: Tuple[str, ...] = ()           # checkpoints, artifacts, model files, or one MLFF registry
    device: str = "cpu"                    # cpu | gpu
    backends: Optional[Tuple[str, ...]] = None  # target[:precision] rows for checkpoints; None: the defaults
    all_rows: bool = False                 # every CPU backend x precision (--all)
    batches: Optional[Tuple[int, ...]] = None   # None: the device's default (CPU 1,8; GPU its own)
    threads: Optional[int] = 2
    data: str = "synthetic"                # accuracy data (--data)
    calib: Optional[str] = None            # int8 calibration (default: --data)
    rounds: int = 5
    iters: int = 20
    eval_limit: Optional[int] = None
    baseline: Optional[str] = None         # --baseline ROW; None: the plain OpenVINO row where present
    settle_s: float = DEFAULT_SETTLE_S     # a busy machine's time to settle (bench.busy)
    max_autotune: bool = False             # GPU: torch.compile max-autotune rows
    server: Optional[str] = None           # a served model's row (--server URL) ...
    served_model: Optional[str] = None     # ... its name (--model)
    spec_from: Optional[str] = None        # ... its preprocessing from this artifact
    concurrency: int = 2                   # requests in flight for the async column
    input_size: Optional[Tuple[int, int]] = None  # --size: every CPU row runs at it (checkpoints compiled for it)

    def cpu_batches(self) -> Tuple[int, ...]:
        return self.batches or DEFAULT_CPU_BATCHES
