"""``edgekit prune CKPT --ratio R [--finetune RECIPE] --out CKPT``: structured channel pruning."""
from __future__ import annotations

import contextlib
from pathlib import Path

import click

from edgekit.commands._common import (check_out, echo_json, force_option, json_option, limit_option, model_path,
                                     out_option, result_stdout, threads_option)
from edgekit.errors import EdgekitError

EXTRA = "prune"  # Torch-Pruning: without it edgekit.cli lists prune as needing edgekit[prune]
REQUIRES = ("torch", "torch_pruning")  # the prune extra brings both


@click.command("prune")
@click.argument("model", required=False, metavar="[CKPT]")
@click.option("--ratio", required=True, type=float, help="Fraction of every stage's channels to remove (0 <= R < 1).")
@click.option("--finetune", "recipe", default=None, type=click.Path(dir_okay=False),
              help="Fine-tune the pruned model with this recipe (e.g. recipes/gmbinet_sd900.yaml).")
@click.option("--profile", default="finetune", show_default=True, help="Recipe profile for the fine-tuning.")
@click.option("--data", default=None,
              help="SD-900 folder (or synthetic:N): its train split recalibrates the pruned model's BatchNorm "
                   "statistics, its val split checks source vs pruned, and --finetune trains on it "
                   "(default: the recipe's data.path).")
@click.option("--importance", type=click.Choice(["auto", "magnitude", "magnitude-gmbi", "taylor"]), default="auto",
              show_default=True,
              help="Channel ranking: weight magnitude, magnitude including the GMBI units' weights, or "
                   "first-order Taylor (needs --data). auto: taylor with --data, else magnitude.")
@click.option("--taylor-images", default=32, show_default=True, type=click.IntRange(1),
              help="Train images whose loss gradients rank the channels for --importance taylor.")
@click.option("--bn-images", default=200, show_default=True, type=click.IntRange(0),
              help="Train images for the BatchNorm recalibration after pruning (0: keep the old statistics).")
@click.option("--iterations", default=None, type=click.IntRange(1), help="Override the profile's iterations.")
@click.option("--budget", default=None, metavar="DURATION",
              help="Fine-tune for a time budget (6m, 90s, ...) instead of the profile's iterations, as "
                   "edgekit train --budget (e.g. with --profile gpu: the split on the GPU, bf16).")
@click.option("--distill", default=None, type=click.FloatRange(0),
              help="Weight of distillation from the unpruned model (BCE towards its main-head probabilities); "
                   "overrides the recipe's loss.distill, 0 turns it off.")
@click.option("--exact", is_flag=True,
              help="Keep exactly the widths the ratio gives. Default: round each kept channel count up to a "
                   "multiple every registered backend compiles (cuda-fused: 4; cpu-fused takes any), said on stderr "
                   "and recorded in the provenance.")
@threads_option()
@limit_option("limit_images", "--limit-images")
@click.option("--work", "work_dir", default=None, type=click.Path(file_okay=False),
              help="Keep the fine-tuning run (last.pt, best.pt, report.json) here; default: a temporary folder.")
@out_option("file", "Pruned checkpoint to write.")
@force_option
@json_option
def prune_cmd(model, ratio, recipe, profile, data, importance, taylor_images, bn_images, iterations, budget, distill,
              exact, threads, limit_images, work_dir, out, force, as_json):
    """Remove channels (equally from every GMBI group), optionally fine-tune; save an edgekit checkpoint."""
    from edgekit.models.checkpoint import load_checkpoint
    from edgekit.progress import say, write_stderr
    from edgekit.train.prune import prune_and_finetune

    out_path = Path(out)
    check_out(out_path, force)
    if not out_path.parent.is_dir():
        raise EdgekitError(f"--out: folder {out_path.parent} does not exist")
    r = None
    budget_s = None
    if (budget is not None or distill is not None) and not recipe:
        raise EdgekitError("--budget and --distill are for fine-tuning: add --finetune RECIPE")
    if recipe:
        from edgekit.train.recipe import load_recipe, parse_budget

        budget_s = parse_budget(budget) if budget is not None else None
        if budget_s and iterations:
            raise EdgekitError("--budget and --iterations exclude each other (the budget sets the iterations)")
        r = load_recipe(recipe, profile)  # a bad recipe fails before any work
        if threads:
            r.train.threads = threads
        if distill is not None:
            r.loss.distill = float(distill)
    ck = load_checkpoint(model_path(model, quiet=True))  # quiet: a refused ratio stays one error line
    # without --json too, whatever a library prints to stdout meanwhile goes to stderr: stdout is the result's
    with contextlib.nullcontext() if as_json else result_stdout():  # --json: json_option redirected it already
        result = prune_and_finetune(ck, ratio, out_path, data=data, recipe=r, importance=importance,
                                    taylor_images=taylor_images, bn_images=bn_images, limit_images=limit_images,
                                    exact=exact, iterations=iterations, budget_s=budget_s, work_dir=work_dir,
                                    note=write_stderr, log=say)
    if as_json:
        echo_json(result)
        return
    if result["bn_recalibration"]:  # what was done, not what came out: a note
        write_stderr(f"BatchNorm statistics recalibrated on {result['bn_recalibration']['images']} images")
    w0, w1 = result["widths_before"], result["widths_after"]
    click.echo(f"pruned {ck.path}: widths {w0} -> {w1}; parameters {result['params_before']:,} -> "
               f"{result['params_after']:,}; MACs at 512 {result['macs_before'] / 1e9:.3f} G -> "
               f"{result['macs_after'] / 1e9:.3f} G")
    if "check" in result:
        c = result["check"]
        click.echo(f"{c['data']}: IoU {c['source_iou']:.4f} -> {c['pruned_iou']:.4f} "
                   f"(MAE {c['source_mae']:.4f} -> {c['pruned_mae']:.4f}) before fine-tuning")
    if "finetune" in result:
        t = result["finetune"]["test"]
        click.echo(f"fine-tuned {result['finetune']['iterations']} iterations: test MAE {t['mae']:.4f} IoU {t['iou']:.4f}")
    click.echo(f"wrote {out_path}")


commands = [prune_cmd]
