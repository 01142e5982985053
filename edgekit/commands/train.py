"""``edgekit train RECIPE``: train a model from a YAML recipe (see recipes/gmbinet_sd900.yaml)."""
from __future__ import annotations

import sys

import click

from edgekit.commands._common import BUILD_EXTRA, input_size_option, limit_option, needs, resize_option
from edgekit.errors import EdgekitError


@needs(BUILD_EXTRA, "torch", "yaml")  # a recipe is YAML
@click.command("train")
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--profile", default=None, help="Recipe profile (e.g. cpu, gpu); default: the recipe's default_profile.")
@click.option("--data", default=None, help="SD-900 folder, images/+masks/ folder or synthetic[:N] (default: the recipe's data.path).")
@click.option("--out", "out_dir", default=None, type=click.Path(file_okay=False),
              help="Output folder for last.pt, best.pt, report.json (default: runs/<recipe>-<profile>).")
@click.option("--resume", default=None, type=click.Path(dir_okay=False), help="Continue from a run's last.pt.")
@click.option("--init", "init_ckpt", default=None, type=click.Path(dir_okay=False),
              help="Fine-tune this checkpoint (its architecture and weights) instead of training from scratch.")
@click.option("--seed", default=None, type=int, help="Override train.seed.")
@click.option("--iterations", default=None, type=click.IntRange(1), help="Override train.iterations (smoke tests).")
@limit_option("limit_images", "--limit-images")
@click.option("--nproc", default=1, show_default=True, type=click.IntRange(1),
              help="Processes on this machine, started by torch.distributed.run (gloo on the CPU, NCCL on GPUs); "
                   "train.batch stays the global batch. Several machines: run under torchrun (README).")
@click.option("--budget", default=None, metavar="DURATION",
              help="Train for a time budget (6m, 90s, 1h, 2m30s) instead of train.iterations: the cosine horizon "
                   "is set from a measured step time so the run ends on time with its lr annealed, best.pt and "
                   "report.json written.")
@input_size_option(help="Train at this input height x width, or N for N x N (default: the recipe's "
                   "preprocess.input_size); recorded in the checkpoint's preprocessing spec.")
@resize_option(help="How images reach the input size: stretch or letterbox (aspect ratio kept, padded); default: "
               "the recipe's preprocess.resize (stretch); recorded in the checkpoint's preprocessing spec.")
def train_cmd(recipe, profile, data, out_dir, resume, init_ckpt, seed, iterations, limit_images, nproc, budget,
              input_size=None, resize=None):
    """Train from a recipe; writes last.pt (resumable), best.pt (best val IoU) and report.json (test split)."""
    from tqdm import tqdm

    from edgekit.train.loop import train
    from edgekit.train.recipe import load_recipe

    from edgekit.train.recipe import parse_budget

    budget_s = parse_budget(budget) if budget is not None else None
    r = load_recipe(recipe, profile)  # a bad recipe fails here, once, before any process starts
    if input_size is not None:
        if min(input_size) < 32:  # the recipe's own rule: five stride-2 stages
            raise EdgekitError(f"--input-size {input_size[0]}x{input_size[1]}: training needs at least 32 a side")
        r.preprocess.input_size = list(input_size)
    if resize is not None:
        r.preprocess.resize = resize
    if init_ckpt and resume:
        raise EdgekitError("--init and --resume exclude each other (a resumed run has its own weights)")
    if nproc > 1 and budget_s:
        raise EdgekitError("--budget runs in one process (--nproc 1)")
    if nproc > 1:
        from edgekit.train.distributed import launch

        if r.train.batch % nproc:
            raise EdgekitError(f"train.batch {r.train.batch} (the global batch) does not split over {nproc} "
                               f"processes: use a multiple of {nproc}")
        args = [recipe]
        for flag, value in (("--profile", profile), ("--data", data), ("--out", out_dir), ("--resume", resume),
                            ("--init", init_ckpt), ("--seed", seed), ("--iterations", iterations),
                            ("--limit", limit_images), ("--resize", resize),
                            ("--input-size", "x".join(map(str, input_size)) if input_size else None)):
            if value is not None:
                args += [flag, str(value)]
        click.echo(launch(nproc, args).stdout.strip())
        return
    init = None
    if init_ckpt:
        from edgekit.models.checkpoint import load_checkpoint

        init = load_checkpoint(init_ckpt)

    def log(msg: str) -> None:
        tqdm.write(msg, file=sys.stderr)

    res = train(r, data=data, out_dir=out_dir, resume=resume, seed=seed, iterations=iterations,
                limit_images=limit_images, log=log, init=init, budget_s=budget_s)
    if res.test is None:  # a rank other than 0 of a distributed run: rank 0 reports
        return
    o = res.test["overall"]
    click.echo(f"best.pt: {res.best} (iteration {res.best_iteration}, val IoU {res.best_val_iou:.4f}); "
               f"test MAE {o['mae']:.4f} IoU {o['iou']:.4f} max F {o['max_f']:.4f}; report: {res.report}; "
               f"{res.wall_s / 60:.1f} min")


commands = [train_cmd]
