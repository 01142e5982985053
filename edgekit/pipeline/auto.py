"""``--precision auto``: build each candidate precision, measure it here, keep the fastest that holds
the accuracy budget. Speed is measured on this machine in interleaved rounds (see bench), so the
choice reflects the CPU at hand: bf16 wins on CPUs with native bf16, fp32 elsewhere, INT8 where
its convolutions outweigh the quantize/dequantize overhead."""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Callable, Optional

from edgekit.errors import EdgekitError
from edgekit.artifact import artifact_writer, read_manifest, sign_artifact, verify_artifact, write_manifest



def candidates_for(target: str):
    """Every concrete precision the target offers ("default" is the baseline, not a choice)."""
    from edgekit.backends.registry import get_backend

    return [p for p in get_backend(target).precisions if p != "default"]


def compile_auto(source_path: str, target: str, out: str, *, parity_data: str, calib: Optional[str], subset: int,
                 int8_scheme: str, max_drop: Optional[float], metric: str, val: Optional[str], force: bool,
                 threads: Optional[int], log: Callable = print, sign_key=None, input_size=None, resize=None) -> dict:
    from edgekit import runtime
    from edgekit.eval.timing import Row, time_rows
    from edgekit.data.datasets import open_segmentation
    from edgekit.eval.evaluate import evaluate
    from edgekit.backends.registry import get_backend
    from edgekit.pipeline.build import build_artifact
    from edgekit.pipeline.sources import open_source

    budget = 0.005 if max_drop is None else max_drop
    check_data = val or parity_data
    dataset = open_segmentation(check_data, "val" if (Path(check_data) / "split.json").is_file() else "test")
    reference = evaluate(open_source(source_path, input_size=input_size, resize=resize).reference_runner(threads), dataset, show_progress=False)["overall"][metric]
    with tempfile.TemporaryDirectory() as tmp:
        built = []
        for precision in candidates_for(target):
            folder = Path(tmp) / precision
            try:
                if precision == "int8" and calib is None:
                    raise EdgekitError("needs --calib")
                build_artifact(get_backend(target), source_path, precision, str(folder), parity_data=parity_data,
                               calib=calib, subset=subset, int8_scheme=int8_scheme, max_drop=None, metric=metric,
                               val=None, force=False, threads=threads, log=lambda *_: None,
                               input_size=input_size, resize=resize)
                runner = runtime.load(verify_artifact(folder, use_env=False), threads=threads)  # not signed yet
                runner.warmup()
            except EdgekitError as e:
                log(f"auto: {precision} skipped ({e})")
                continue
            except RuntimeError as e:  # e.g. a precision the CPU plugin does not support here
                log(f"auto: {precision} skipped ({str(e).splitlines()[0][:100]})")
                continue
            score = evaluate(runner, dataset, show_progress=False)["overall"][metric]
            drop = (score - reference) if metric == "mae" else (reference - score)
            built.append((precision, folder, Row(precision, runner, 0), score, drop))
        if not built:
            raise EdgekitError(f"--precision auto: no candidate could be built for {target}")
        time_rows([b[2] for b in built], [1], rounds=5, iters=10, warmup=3, show_progress=False)
        import numpy as np

        candidates = []
        for precision, folder, row, score, drop in built:
            fps = 1.0 / float(np.median(row.lat[1]))
            candidates.append({"precision": precision, "fps_b1": fps, metric: score, "drop": drop,
                               "within_budget": drop <= budget})
            log(f"auto: {precision:5s} {fps:8.1f} FPS  {metric} {score:.4f} (drop {drop:+.4f})")
        ok = [c for c in candidates if c["within_budget"]]
        if not ok:
            raise EdgekitError(f"--precision auto: no candidate keeps {metric} within {budget} of the source model")
        best = max(ok, key=lambda c: c["fps_b1"])
        chosen = Path(tmp) / best["precision"]
        with artifact_writer(out, force=force) as folder:
            for f in chosen.iterdir():  # files and folders (cpu-fused keeps its libraries in kernels/)
                if f.is_dir():
                    shutil.copytree(f, folder / f.name)
                else:
                    shutil.copy2(f, folder / f.name)
            manifest = read_manifest(folder)
            manifest["auto"] = {"metric": metric, "budget": budget, "data": dataset.description,
                                "reference": reference, "candidates": candidates, "chosen": best["precision"]}
            files = list(manifest.pop("files"))
            for k in ("format", "format_version", "created", "size_bytes"):
                manifest.pop(k, None)
            manifest = write_manifest(folder, manifest, files)
            if sign_key is not None:
                sign_artifact(folder, sign_key)
    log(f"auto: kept {best['precision']} ({best['fps_b1']:.1f} FPS, {metric} drop {best['drop']:+.4f}) -> {out}")
    return manifest
