"""Deployment commands: compile, quantize."""
from __future__ import annotations

from pathlib import Path

import click

from edgekit.backends.registry import targets
from edgekit.bench.busy import DEFAULT_SETTLE_S
from edgekit.commands._common import (check_out, echo_json, force_option, input_size_option, json_option,
                                     limit_option, model_path, out_option, parse_batches, resize_option,
                                     result_stdout, threads_option, write_json)
from edgekit.errors import EdgekitError
from edgekit.commands._common import build_command  # compile and quantize need edgekit[build] (torch)
from edgekit.pipeline.request import CompileRequest

CALIB_HELP = ("Calibration images for int8 (required): a folder, an SD-900 folder (its train split), or "
              "synthetic[:N] to calibrate on edgekit's synthetic images.")
PARITY_HELP = ("Images for the parity check (default: the real images given by --val, else --calib, "
               "else synthetic:12).")


def targets_help() -> str:
    return "; ".join([f"{t.name}: {t.description} ({', '.join(t.compile_precisions)})" for t in targets()]
                     + ["auto: build every target and precision this machine offers, keep the fastest within "
                        "--max-drop on --val (float only without --val), say why"])


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


@build_command
@click.command("compile")
@click.argument("model", required=False, metavar="[CKPT|REGISTRY|BACKBONE]")
@click.option("--target", required=True, metavar="TARGET", help=targets_help())
@click.option("--precision", default=None,
              help="fp32 | bf16 | fp16 | int8 | default | auto (what each target offers: see --target) "
                   "[default: fp32; auto with --target auto]")
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
    request = CompileRequest(source=model_path(model, registry_ok=True), target=target, precision=precision, out=out,
                             calib=calib, subset=subset, int8_scheme=int8_scheme, max_drop=max_drop, metric=metric,
                             val=val, parity_data=parity_data, threads=threads, force=force, as_backbone=as_backbone,
                             sign_key=key, input_size=input_size, resize=resize)
    _run(request, as_json)


def _run(request, as_json: bool) -> None:
    """Compile ``request``: the build's messages and auto's measurements on stderr (edgekit.progress); on stdout
    the result alone: the ``wrote OUT: ...`` line, or with --json the manifest, the one document."""
    import contextlib

    from edgekit.pipeline.compile import compile_artifact
    from edgekit.progress import say, write_stderr

    lines = []
    # without --json too, whatever a library prints to stdout meanwhile (NNCF, a compiler) goes to stderr
    with contextlib.nullcontext() if as_json else result_stdout():  # --json: json_option redirected it already
        # the build's messages are progress (a terminal, or EDGEKIT_PROGRESS=1): a script's stderr stays the one
        # error line when the build is refused late (a missed --max-drop); auto's measurements are always shown
        manifest = compile_artifact(request, log=say, note=write_stderr,
                                    result=write_stderr if as_json else lines.append)
    if as_json:
        echo_json(manifest)
    for line in lines:
        click.echo(line)


@build_command
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
    request = CompileRequest(source=model_path(model, registry_ok=True), target=target, precision="int8", out=out,
                             calib=calib, subset=subset, int8_scheme=int8_scheme, max_drop=max_drop, metric=metric,
                             val=val, parity_data=parity_data, threads=threads, force=force, as_backbone=as_backbone,
                             sign_key=key, input_size=input_size, resize=resize)
    _run(request, as_json)


@click.command("bench")
@click.argument("models", nargs=-1, metavar="[CKPT|ARTIFACT|MODEL.onnx|MODEL.xml]... | REGISTRY")
@click.option("--device", default="cpu", show_default=True, type=click.Choice(["cpu", "gpu"]))
@click.option("--backends", default=None, help="Comma list of target[:precision] for checkpoints, e.g. "
              "torch,openvino:bf16,openvino:int8 (default: each backend's bench_default rows).")
@click.option("--all", "all_rows", is_flag=True, help="Every CPU backend x precision the registry offers (onnx, ort, "
              "openvino, executorch, cpu-fused: about a dozen artifacts to build instead of 4).")
@click.option("--batch", "batch", default="1,8", show_default=True, help="Comma list of batch sizes.")
@threads_option(default=2)
@click.option("--data", default="synthetic", show_default=True,
              help="Accuracy data: synthetic[:N] (scored as agreement with the PyTorch model only), a folder of "
                   "images and masks (IoU/MAE too), or SD-900 (its test split; the paper's row beside it).")
@click.option("--calib", default=None, help="Calibration data for int8 rows (default: --data's train split, or the "
              "synthetic generator).")
@click.option("--rounds", default=5, show_default=True, type=click.IntRange(1))
@click.option("--iters", default=20, show_default=True, type=click.IntRange(1), help="Calls per row per round.")
@click.option("--baseline", default=None, metavar="ROW",
              help="The row the 'vs baseline' ratios are taken against: a row name as the table shows it, the part "
                   "before its '(...)', or an artifact folder's name (default: the openvino:default row, if any).")
@click.option("--settle-time", "settle_s", default=DEFAULT_SETTLE_S, show_default=True, type=click.FloatRange(0),
              metavar="SECONDS", help="When the load average or the round spread says the machine is busy, time "
              "more rounds for up to this long until the spread settles (0: never; the warning stays).")
@limit_option("eval_limit", "--eval-limit")
@click.option("--json", "json_out", is_flag=False, flag_value="-", default=None, type=click.Path(dir_okay=False),
              help="Print the results on stdout as one JSON document (the table goes to stderr). "
                   "--json FILE, the older form, writes them to FILE like --out.")
@out_option("file", "Write the results JSON here (and the plot beside it).", required=False, dest="out_json")
@force_option
@click.option("--plot", "plot_out", default=None, type=click.Path(dir_okay=False),
              help="FPS-vs-accuracy PNG (default: beside --out).")
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
def bench_cmd(models, device, backends, all_rows, batch, threads, data, calib, rounds, iters, baseline, settle_s,
              eval_limit, json_out, out_json, force, plot_out, max_autotune=False, server=None, served_model=None,
              spec_from=None, concurrency=2, size=None):
    """One table: size, accuracy, latency p50/p90/p99 and FPS of every backend x precision.

    Without --backends a checkpoint (default: the embedded one) gets the backends' default rows:
    torch, the plain OpenVINO baseline (openvino:default), OpenVINO fp32 and INT8, and cpu-fused fp32
    where a C++ compiler and AVX2 are present; their artifacts are compiled once and cached. --all gives every CPU backend x precision.

    Accuracy: every row's agreement with its PyTorch model on the same images (mask IoU, pixels that agree,
    largest probability difference); IoU/MAE against the masks only on real images (--data), and the
    paper's own row only beside SD-900. A busy machine (load average or round spread) is said in one line
    on stderr and given --settle-time to settle.

    Given an MLFF adapter REGISTRY (and --data class folders): its backbone per backend + the adapter heads,
    with top-1 accuracy on the held-out part of --data. With --server: a served model's row beside the local ones.
    """
    from edgekit.bench.request import BenchRequest
    from edgekit.bench.run import kind_of

    as_json = json_out == "-"
    file_out = out_json or (None if as_json else json_out)  # --out FILE, or the older --json FILE
    check_out(out_json, force)
    explicit_batch = click.get_current_context().get_parameter_source("batch") != click.core.ParameterSource.DEFAULT
    request = BenchRequest(
        models=tuple(model_path(m, registry_ok=True) for m in models) or (() if server else (model_path(None),)),
        device=device, backends=tuple(s.strip() for s in backends.split(",") if s.strip()) if backends else None,
        all_rows=all_rows, batches=tuple(parse_batches(batch)) if explicit_batch else None, threads=threads,
        data=data, calib=calib, rounds=rounds, iters=iters, eval_limit=eval_limit, baseline=baseline,
        settle_s=settle_s, max_autotune=max_autotune, server=server, served_model=served_model,
        spec_from=spec_from, concurrency=concurrency, input_size=size)
    kind = kind_of(request)
    if not as_json:
        return _bench(request, kind, file_out, plot_out, err=False)
    with result_stdout():
        result = _bench(request, kind, file_out, plot_out, err=True)
        echo_json(result)


def _bench(request, kind: str, json_file, plot_out, err: bool) -> dict:
    """Call the bench ``kind`` asks for, write the JSON file and the plot, print its table (stderr when
    ``err``: stdout then carries the JSON)."""
    log = lambda m: click.echo(f"bench: {m}", err=True)  # noqa: E731 - stage lines on stderr
    if kind == "gpu":
        from edgekit.bench.run import bench_gpu

        result = bench_gpu(request, log=lambda m: click.echo(m, err=True))
    elif kind == "mlff":
        from edgekit.bench.run import bench_registry

        result = bench_registry(request, log=lambda m: click.echo(m, err=True))
    else:
        from edgekit.bench.run import bench_cpu, check_backend_specs

        served = None
        if request.server:  # the served row first: a server that is not up fails before anything is compiled
            if request.backends:
                check_backend_specs(list(request.backends))
            if not request.served_model:
                raise EdgekitError("--server needs --model NAME (the served model)")
            from edgekit.serve.client import ServerRunner

            served = ServerRunner(request.server, request.served_model, spec_from=request.spec_from)
        result = bench_cpu(request, served=served, log=log)
    _save_result(result, None if kind == "gpu" else request.threads, json_file, plot_out)
    _print_table(result, kind, request, err)
    return result


def _save_result(result: dict, threads, json_file, plot_out) -> None:
    """Record the settings and the command line, write the JSON file and the plot (beside the JSON file
    by default): the CPU, MLFF and GPU benches alike."""
    import sys

    from edgekit.bench.cpu import plot

    result["settings"]["threads"] = threads
    result["command"] = "edgekit " + " ".join(sys.argv[1:])
    if json_file:
        write_json(json_file, result)
        plot_out = plot_out or str(Path(json_file).with_suffix(".png"))
    if plot_out:
        plot(result, Path(plot_out))


def _print_table(result: dict, kind: str, request, err: bool) -> None:
    from edgekit.commands._common import print_table

    if kind == "gpu":
        from edgekit.bench.gpu import TABLE_COLUMNS, table_caption, table_rows, table_title

        return print_table(table_title(result), TABLE_COLUMNS, table_rows(result), caption=table_caption(result),
                           err=err)
    if kind == "mlff":
        return _print_mlff_table(result, request, err)
    from edgekit.bench.cpu import table_caption, table_columns, table_rows, table_title

    print_table(table_title(result), table_columns(result, request.concurrency), table_rows(result),
                caption=table_caption(result), err=err)


def _print_mlff_table(result: dict, request, err: bool) -> None:
    from edgekit.bench.cpu import format_fps, format_latency, format_speedup
    from edgekit.commands._common import print_table

    table = []
    for r in result["rows"]:
        table.append((r["name"], f"{r['backbone_bytes'] / 1e6:.2f} MB", f"{r['adapter_bytes'] / 1e3:.1f} kB",
                      f"{r['accuracy']:.4f}", f"{r['top1_agreement_vs_torch']:.4f}"
                      if r["top1_agreement_vs_torch"] is not None else "-",
                      format_latency(r["latency_ms"]), format_fps(r), f"{r['fps_best']:.1f} (b{r['best_batch']})",
                      format_speedup(r)))
    m, mo = result["machine"], result["model"]
    print_table(f"edgekit bench {request.models[0]}: {mo['backbone']} + {mo['heads']} head(s)  ({m['cpu']}, "
                f"{m['logical_cpus']} CPUs, {request.threads} threads)",
                ["row", "backbone", "adapter", "accuracy", "agree vs torch", "latency ms p50/p90/p99",
                 "FPS b1 (round min-max)", "FPS best batch", "vs torch (round min-max)"], table,
                caption=f"top-1 accuracy on {result['eval_images']} images of {result['data']}; latency per image: "
                        "backbone + adapter trunk + all heads", err=err)


commands = [compile_cmd, quantize_cmd, bench_cmd]
