"""Deployment commands: compile, quantize."""
from __future__ import annotations

from pathlib import Path

import click

from edgekit.backends.registry import targets
from edgekit.commands._common import (check_out, echo_json, force_option, input_size_option, json_option,
                                     limit_option, model_path, out_option, parse_batches, resize_option,
                                     result_stdout, threads_option, write_json)
from edgekit.errors import EdgekitError

CALIB_HELP = ("Calibration images for int8 (required): a folder, an SD-900 folder (its train split), or "
              "synthetic[:N] to calibrate on edgekit's synthetic images.")
PARITY_HELP = ("Images for the parity check (default: the real images given by --val, else --calib, "
               "else synthetic:12).")


def targets_help() -> str:
    return "; ".join(f"{t.name}: {t.description} ({', '.join(t.compile_precisions)})" for t in targets())


_SIGN = click.option("--sign", "sign_key", default=None, type=click.Path(dir_okay=False), metavar="PRIVATE_KEY",
                     help="Sign the artifact: manifest.sig, an Ed25519 signature (edgekit keygen's private_key.pem) "
                          "over manifest.json, which holds every file's sha256. Devices verify it with the public "
                          "key (runtime.load(..., trusted_keys=...), EDGEKIT_TRUSTED_KEYS, serve --trusted-key).")


def _load_sign_key(path):
    """The signing key, loaded (one error line) before any work starts."""
    if path is None:
        return None
    from edgekit.keys import load_private_key

    return load_private_key(path)


_AS_BACKBONE = click.option("--as-backbone", is_flag=True,
                            help="MODEL is an MLFF backbone (a weights or checkpoint file): compile its pooled tap "
                                 "features. A registry folder or a backbone name (efficientnet-lite0) is one anyway.")


# The INT8 accuracy budget: the same options and rule for compile (every INT8 target) and quantize (NNCF).
_MAX_DROP = click.option("--max-drop", default=None, type=click.FloatRange(0),
                         help="INT8: refuse, writing nothing, if the metric on --val drops by more (MLFF backbone: the "
                              "adapter's top-1 accuracy).")
_METRIC = click.option("--metric", default="iou", show_default=True, type=click.Choice(["iou", "mae", "max_f"]))
_VAL = click.option("--val", default=None, help="Validation images with masks for --max-drop (SD-900 folder: its val "
                                                "split); INT8 before/after is recorded in the manifest.")


@click.command("compile")
@click.argument("model", required=False, metavar="[CKPT|REGISTRY|BACKBONE]")
@click.option("--target", required=True, metavar="TARGET", help=targets_help())
@click.option("--precision", default="fp32", show_default=True,
              help="fp32 | bf16 | fp16 | int8 | default | auto (what each target offers: see --target)")
@out_option("folder", "Artifact folder to write.")
@click.option("--calib", default=None, help=CALIB_HELP)
@click.option("--subset", default=100, show_default=True, type=click.IntRange(1), help="Calibration images.")
@click.option("--int8-scheme", default="pointwise", show_default=True,
              type=click.Choice(["default", "stem-head-float", "conv-only", "pointwise", "trt-entropy"]),
              help="NNCF Q/DQ placement; trt-entropy: TensorRT's own entropy calibrator (TensorRT 8.5-10.x).")
@_MAX_DROP
@_METRIC
@_VAL
@click.option("--parity-data", default=None, help=PARITY_HELP)
@input_size_option()
@resize_option()
@threads_option()
@force_option
@_AS_BACKBONE
@_SIGN
@json_option
def compile_cmd(model, target, precision, out, calib, subset, int8_scheme, max_drop, metric, val, parity_data, threads,
                force, as_backbone, sign_key, as_json, input_size=None, resize=None):
    """Compile a checkpoint, or the frozen backbone of an MLFF adapter registry, into a verified artifact folder."""
    check_out(out, force)  # before anything is imported or loaded
    key = _load_sign_key(sign_key)
    source = model_path(model, registry_ok=True)
    from edgekit.pipeline.compile import compile_model

    manifest = compile_model(source, target, precision, out, parity_data=parity_data,
                             calib=calib, subset=subset, int8_scheme=int8_scheme, max_drop=max_drop, metric=metric,
                             val=val, force=force, threads=threads, log=_log(as_json), as_backbone=as_backbone,
                             sign_key=key, input_size=input_size, resize=resize)
    if as_json:
        echo_json(manifest)


def _log(as_json: bool):
    """Compile progress: stdout is the result's, so with --json the lines go to stderr."""
    return (lambda m: click.echo(m, err=True)) if as_json else click.echo


@click.command("quantize")
@click.argument("model", required=False, metavar="[CKPT|ARTIFACT|REGISTRY|BACKBONE]")
@click.option("--target", required=True, type=click.Choice([t.name for t in targets() if t.int8 == "nncf"]))
@click.option("--calib", default=None, help=CALIB_HELP)
@click.option("--subset", default=100, show_default=True, type=click.IntRange(1), help="Calibration images used.")
@_MAX_DROP
@_METRIC
@_VAL
@click.option("--int8-scheme", default="pointwise", show_default=True,
              type=click.Choice(["default", "stem-head-float", "conv-only", "pointwise"]))
@click.option("--parity-data", default=None, help=PARITY_HELP)
@out_option("folder", "Artifact folder to write.")
@input_size_option()
@resize_option()
@threads_option()
@force_option
@_AS_BACKBONE
@_SIGN
@json_option
def quantize_cmd(model, target, calib, subset, max_drop, metric, val, int8_scheme, parity_data, out, threads,
                 force, as_backbone, sign_key, as_json, input_size=None, resize=None):
    """INT8 post-training quantization with NNCF (accuracy-controlled with --max-drop and --val)."""
    check_out(out, force)  # before anything is imported or loaded
    key = _load_sign_key(sign_key)
    source = model_path(model, registry_ok=True)
    from edgekit.pipeline.compile import compile_model

    manifest = compile_model(source, target, "int8", out, parity_data=parity_data, calib=calib,
                             subset=subset, int8_scheme=int8_scheme, max_drop=max_drop, metric=metric, val=val,
                             force=force, threads=threads, log=_log(as_json), as_backbone=as_backbone,
                             sign_key=key, input_size=input_size, resize=resize)
    if as_json:
        echo_json(manifest)



@click.command("bench")
@click.argument("models", nargs=-1, metavar="[CKPT|ARTIFACT|MODEL.onnx|MODEL.xml]... | REGISTRY")
@click.option("--device", default="cpu", show_default=True, type=click.Choice(["cpu", "gpu"]))
@click.option("--backends", default=None, help="Comma list of target[:precision] for checkpoints, e.g. "
              "torch,openvino:bf16,openvino:int8 (default: each backend's bench_default rows).")
@click.option("--all", "all_rows", is_flag=True, help="Every CPU backend x precision the registry offers (onnx, ort, "
              "openvino, executorch, cpu-fused: about a dozen artifacts to build instead of 4).")
@click.option("--batch", "batch", default="1,8", show_default=True, help="Comma list of batch sizes.")
@threads_option(default=2)
@click.option("--data", default="synthetic", show_default=True, help="Accuracy data (SD-900 test split when given).")
@click.option("--calib", default=None, help="Calibration data for int8 rows (default: --data's train split, or the "
              "synthetic generator).")
@click.option("--rounds", default=5, show_default=True, type=click.IntRange(1))
@click.option("--iters", default=20, show_default=True, type=click.IntRange(1), help="Calls per row per round.")
@limit_option("eval_limit", "--eval-limit")
@click.option("--json", "json_out", is_flag=False, flag_value="-", default=None, type=click.Path(dir_okay=False),
              help="Print the results on stdout as one JSON document (the table goes to stderr). "
                   "--json FILE, the older form, writes them to FILE like --out.")
@out_option("file", "Write the results JSON here (and the plot beside it).", required=False, dest="out_json")
@force_option
@click.option("--plot", "plot_out", default=None, type=click.Path(dir_okay=False),
              help="FPS-vs-IoU PNG (default: beside --out).")
@click.option("--max-autotune", is_flag=True, help="GPU: torch.compile rows with mode=max-autotune (minutes per batch size).")
@click.option("--server", default=None, metavar="URL", help="A served model's row (HOST:PORT, http://, grpc://; Open "
              "Inference Protocol), beside the local rows of any ARTIFACT given.")
@click.option("--model", "served_model", default=None, metavar="NAME", help="With --server: the model name.")
@click.option("--spec-from", default=None, metavar="ARTIFACT", help="With --server: take the preprocessing from this "
              "artifact (servers without Triton's model-config API, e.g. OVMS).")
@click.option("--concurrency", default=2, show_default=True, type=click.IntRange(1),
              help="Requests in flight for the async column (with --server: FPS at concurrency N).")
@input_size_option("--size", "size", help="Input height x width (or N for N x N) every row runs at (default: the "
                   "model's own): a checkpoint's rows are compiled for it (cached per size); artifacts must have it.")
def bench_cmd(models, device, backends, all_rows, batch, threads, data, calib, rounds, iters, eval_limit, json_out,
              out_json, force, plot_out, max_autotune=False, server=None, served_model=None, spec_from=None,
              concurrency=2, size=None):
    """One table: size, IoU/MAE, latency p50/p90/p99 and FPS of every backend x precision.

    Without --backends a checkpoint (default: the embedded one) gets the backends' default rows:
    torch, the plain OpenVINO baseline (openvino:default), OpenVINO fp32 and INT8, and cpu-fused fp32
    where a C++ compiler and AVX2 are present; their artifacts are compiled once and cached. --all gives every CPU backend x precision.

    Given an MLFF adapter REGISTRY (and --data class folders): its backbone per backend + the adapter heads,
    with top-1 accuracy on the held-out part of --data. With --server: a served model's row beside the local ones.
    """
    import tempfile

    as_json = json_out == "-"
    check_out(out_json, force)
    models = [model_path(m, registry_ok=True) for m in models] or ([] if server else [model_path(None)])
    served = dict(server=server, served_model=served_model, spec_from=spec_from, concurrency=concurrency, size=size)
    if not as_json:
        return _bench(models, device, backends, all_rows, batch, threads, data, calib, rounds, iters, eval_limit,
                      out_json or json_out, plot_out, max_autotune, **served)
    with tempfile.TemporaryDirectory(prefix="edgekit-bench-") as tmp, result_stdout():
        written = Path(out_json) if out_json else Path(tmp) / "bench.json"
        _bench(models, device, backends, all_rows, batch, threads, data, calib, rounds, iters, eval_limit, str(written),
               plot_out or (None if out_json else str(Path(tmp) / "bench.png")), max_autotune, **served)
        import json

        echo_json(json.loads(written.read_text()))


def _bench(models, device, backends, all_rows, batch, threads, data, calib, rounds, iters, eval_limit, json_out,
           plot_out, max_autotune=False, server=None, served_model=None, spec_from=None, concurrency=2, size=None):
    import os

    # Rows share one process: torch's OpenMP workers must not spin-wait while OpenVINO's threads run
    # (seen here: torch p90 latency of seconds when interleaved). Takes effect if torch is not loaded yet.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

    from edgekit import runtime
    from edgekit.bench.cpu import Row, model_size, run_bench, table_caption, table_columns, table_rows, table_title
    from edgekit.bench.plan import BASELINE, at_size, default_cpu_backends, plan_rows
    from edgekit.commands._common import print_table, set_threads

    if backends and all_rows:
        raise EdgekitError("--all and --backends choose the rows two ways: give one of them")
    if size and (device == "gpu" or server):
        raise EdgekitError("--size is for the local CPU rows (not --device gpu or --server): compile an artifact with "
                           "--input-size and bench that")
    if device == "gpu":
        return _bench_gpu(models, backends, batch, data, calib, rounds, iters, eval_limit, json_out, plot_out, max_autotune)
    batches = parse_batches(batch)
    from edgekit.bench.mlff import is_registry

    if any(is_registry(m) for m in models):
        if size:
            raise EdgekitError("--size is for GMBINet rows; an adapter registry's backbone keeps its own input")
        if len(models) != 1:
            raise EdgekitError("bench takes one adapter registry at a time (no other models beside it)")
        return _bench_mlff(models[0], backends, batches, threads, data, calib, rounds, iters, eval_limit, json_out,
                           plot_out)
    log = lambda m: click.echo(f"bench: {m}", err=True)  # noqa: E731 - stage lines on stderr
    specs = [s.strip() for s in backends.split(",")] if backends else default_cpu_backends(all_rows, log)
    _check_backend_specs(specs)
    set_threads(threads)
    if calib is None:  # int8 rows calibrate on --data (its train split), said in the row's manifest
        calib = data
    if server and not served_model:
        raise EdgekitError("--server needs --model NAME (the served model)")
    served = None
    if server:  # the served row first: a server that is not up fails before anything is compiled
        from edgekit.serve.client import ServerRunner

        served = ServerRunner(server, served_model, spec_from=spec_from)
    planned = plan_rows(list(models), specs, calib, "synthetic:12", threads, log, input_size=size)
    rows = [Row(name, at_size(runtime.load(path, threads=threads), size), model_size(path)) for name, path in planned]
    if served:
        rows.append(Row(f"served {served_model} ({served.protocol})", served, served.size_bytes))
    result = run_bench(rows, data=data, batches=batches, rounds=rounds, iters=iters, eval_limit=eval_limit,
                       baseline=next((n for n, _ in planned if n.startswith(BASELINE)), None), async_jobs=concurrency,
                       log=log)
    result["settings"]["input_sizes"] = sorted({"x".join(map(str, r.runner.spec.input_size)) for r in rows
                                                if getattr(r.runner, "spec", None) is not None})  # what the rows ran at
    _save_result(result, threads, json_out, plot_out)
    print_table(table_title(result), table_columns(concurrency), table_rows(result), caption=table_caption(result),
                err=json_out == "-")


def _check_backend_specs(specs, allow_auto: bool = True) -> None:
    """Every ``target:precision`` of ``--backends`` exists and its package is installed (one line if not)."""
    from edgekit.backends.registry import get_backend
    from edgekit.bench.plan import parse_backend

    for s in specs:
        t, p = parse_backend(s)
        spec = get_backend(t)
        if spec.build is None:  # runs checkpoints as they are (torch)
            spec.require()
            continue
        if p == "auto" and not allow_auto:
            raise EdgekitError("--backends: precision auto is for GMBINet checkpoints")
        spec.check(p)


def _save_result(result: dict, threads, json_out, plot_out) -> None:
    """Record the settings and the command line, write the JSON (``-``: on stdout) and the plot (beside the
    JSON by default): the CPU, MLFF and GPU benches alike."""
    import sys

    from edgekit.bench.cpu import plot

    result["settings"]["threads"] = threads
    result["command"] = "edgekit " + " ".join(sys.argv[1:])
    if json_out == "-":
        echo_json(result)  # the one document on stdout; the table goes to stderr
    elif json_out:
        write_json(json_out, result)
        plot_out = plot_out or str(Path(json_out).with_suffix(".png"))
    if plot_out:
        plot(result, Path(plot_out))


def _bench_mlff(registry, backends, batches, threads, data, calib, rounds, iters, eval_limit, json_out, plot_out):
    """``edgekit bench REGISTRY``: backbone (torch / compiled) + the registry's adapter heads, per image."""
    from edgekit.bench.cpu import format_fps, format_latency, format_speedup
    from edgekit.bench.mlff import MLFF_BASELINE, default_mlff_backends, plan_mlff_rows, run_mlff_bench
    from edgekit.commands._common import print_table, set_threads

    specs = [s.strip() for s in backends.split(",") if s.strip()] if backends else default_mlff_backends()
    _check_backend_specs(specs, allow_auto=False)
    if data.startswith("synthetic"):
        raise EdgekitError("bench REGISTRY needs --data: class folders (DIR/<class>/*, e.g. NEU-CLS) named like the "
                           "registry's classes; accuracy is measured on their fixed held-out part")
    set_threads(threads)
    rows = plan_mlff_rows(registry, specs, data, calib or data, threads, lambda m: click.echo(m, err=True))
    result = run_mlff_bench(rows, data=data, batches=batches, rounds=rounds, iters=iters, eval_limit=eval_limit,
                            baseline=MLFF_BASELINE if "torch" in specs else None, registry=registry)
    _save_result(result, threads, json_out, plot_out)
    table = []
    for r in result["rows"]:
        table.append((r["name"], f"{r['backbone_bytes'] / 1e6:.2f} MB", f"{r['adapter_bytes'] / 1e3:.1f} kB",
                      f"{r['accuracy']:.4f}", f"{r['top1_agreement_vs_torch']:.4f}"
                      if r["top1_agreement_vs_torch"] is not None else "-",
                      format_latency(r["latency_ms"]), format_fps(r), f"{r['fps_best']:.1f} (b{r['best_batch']})",
                      format_speedup(r)))
    m, mo = result["machine"], result["model"]
    print_table(f"edgekit bench {registry}: {mo['backbone']} + {mo['heads']} head(s)  ({m['cpu']}, "
                f"{m['logical_cpus']} CPUs, {threads} threads)",
                ["row", "backbone", "adapter", "accuracy", "agree vs torch", "latency ms p50/p90/p99",
                 "FPS b1 (round min-max)", "FPS best batch", "vs torch (round min-max)"], table,
                caption=f"top-1 accuracy on {result['eval_images']} images of {result['data']}; latency per image: "
                        "backbone + adapter trunk + all heads", err=json_out == "-")


def _bench_gpu(models, backends, batch, data, calib, rounds, iters, eval_limit, json_out, plot_out, max_autotune):
    """``bench --device gpu`` (edgekit.bench.gpu): batch 1 and 32 unless --batch is given."""
    from edgekit.bench.gpu import DEFAULT_GPU_BATCHES, TABLE_COLUMNS, gpu_bench, table_caption, table_rows, table_title
    from edgekit.commands._common import print_table

    if click.get_current_context().get_parameter_source("batch") == click.core.ParameterSource.DEFAULT:
        batch = ",".join(map(str, DEFAULT_GPU_BATCHES))
    batches = parse_batches(batch)
    result = gpu_bench(models, backends=backends, batches=batches, data=data, calib=calib, rounds=rounds, iters=iters,
                       eval_limit=eval_limit, max_autotune=max_autotune, log=lambda m: click.echo(m, err=True))
    _save_result(result, None, json_out, plot_out)  # the GPU rows set no CPU thread count
    print_table(table_title(result), TABLE_COLUMNS, table_rows(result), caption=table_caption(result),
                err=json_out == "-")


commands = [compile_cmd, quantize_cmd, bench_cmd]
