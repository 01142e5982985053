"""``edgekit prune CKPT --ratio R [--finetune RECIPE] --out CKPT``: structured channel pruning."""
from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import click

from edgekit.commands._common import (check_out, echo_json, force_option, json_option, model_path, out_option,
                                     threads_option)
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
@click.option("--limit-images", default=None, type=click.IntRange(1), help="At most N images per split (smoke tests).")
@click.option("--work", "work_dir", default=None, type=click.Path(file_okay=False),
              help="Keep the fine-tuning run (last.pt, best.pt, report.json) here; default: a temporary folder.")
@out_option("file", "Pruned checkpoint to write.")
@force_option
@json_option
def prune_cmd(model, ratio, recipe, profile, data, importance, taylor_images, bn_images, iterations, budget, distill,
              exact, threads, limit_images, work_dir, out, force, as_json):
    """Remove channels (equally from every GMBI group), optionally fine-tune; save an edgekit checkpoint."""
    from edgekit.train.prune import prune_with_data
    from edgekit.models.checkpoint import load_checkpoint

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
    data = data or (r.data_path() if r is not None else None)
    pruned, report = prune_with_data(ck, ratio, data, importance=importance, taylor_images=taylor_images,
                                     bn_images=bn_images, val_limit=limit_images, exact=exact)
    if report.rounding is not None:
        _say_rounding(report)
    result = {"source": str(ck.path), "ratio": ratio, **{k: v for k, v in report.to_dict().items() if k != "ratio"},
              "bn_recalibration": pruned.provenance["bn_recalibration"]}
    if "check" in pruned.provenance:
        result["check"] = pruned.provenance["check"]
    if r is None:
        pruned.save(out_path)
    else:
        from tqdm import tqdm

        from edgekit.train.loop import train

        keep = work_dir is not None
        run_dir = Path(work_dir) if keep else Path(tempfile.mkdtemp(prefix="edgekit-prune-"))
        try:
            teacher = ck.build() if r.loss.distill > 0 else None  # the unpruned model
            res = train(r, data=data, out_dir=str(run_dir), iterations=iterations, limit_images=limit_images,
                        init=pruned, teacher=teacher, log=lambda m: tqdm.write(m, file=sys.stderr), budget_s=budget_s)
            tuned = load_checkpoint(res.best)
            tuned.provenance = {**pruned.provenance, "finetune": tuned.provenance}
            tuned.save(out_path)
            result["finetune"] = {"recipe": r.name, "profile": r.profile, "iterations": res.iteration,
                                  "distill": r.loss.distill, "budget": tuned.provenance["finetune"].get("budget"),
                                  "best_iteration": res.best_iteration, "val_iou": res.best_val_iou,
                                  "test": res.test["overall"], "wall_s": round(res.wall_s, 1),
                                  "run": str(run_dir) if keep else None}
        finally:
            if not keep:
                shutil.rmtree(run_dir, ignore_errors=True)
    result["out"] = str(out_path)
    if as_json:
        echo_json(result)
        return
    w0, w1 = report.widths_before, report.widths_after
    click.echo(f"pruned {ck.path}: widths {w0} -> {w1}; parameters {report.params_before:,} -> "
               f"{report.params_after:,}; MACs at 512 {report.macs_before / 1e9:.3f} G -> {report.macs_after / 1e9:.3f} G")
    if result["bn_recalibration"]:
        click.echo(f"BatchNorm statistics recalibrated on {result['bn_recalibration']['images']} images")
    if "check" in result:
        c = result["check"]
        click.echo(f"{c['data']}: IoU {c['source_iou']:.4f} -> {c['pruned_iou']:.4f} "
                   f"(MAE {c['source_mae']:.4f} -> {c['pruned_mae']:.4f}) before fine-tuning")
    if "finetune" in result:
        t = result["finetune"]["test"]
        click.echo(f"fine-tuned {result['finetune']['iterations']} iterations: test MAE {t['mae']:.4f} IoU {t['iou']:.4f}")
    click.echo(f"wrote {out_path}")


def _say_rounding(report) -> None:
    """One stderr line when rounding changed a width the ratio gives (and one per note)."""
    r = report.rounding
    who = ", ".join(f"{name} {m}" for name, m in r["required_by"].items())
    if r["widths_exact"] != report.widths_after or r["head_width_exact"] != r["head_width"]:
        click.echo(f"note: kept channel counts rounded up to multiples of {r['channel_multiple']} so that every "
                   f"target compiles them ({who}): widths {r['widths_exact']} -> {report.widths_after}, head width "
                   f"{r['head_width_exact']} -> {r['head_width']}; --exact keeps the ratio's widths", err=True)
    for note in r["notes"]:
        click.echo(f"note: {note}", err=True)


commands = [prune_cmd]
