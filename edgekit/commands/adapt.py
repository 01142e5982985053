"""Continual-learning commands: adapt (add a task as an MLFF adapter), adapters (list), classify."""
from __future__ import annotations


import click

from edgekit.commands._common import (build_command, echo_json, json_option, limit_option, note, print_table,
                                      set_threads, threads_option)
from edgekit.errors import EdgekitError

DEFAULT_REGISTRY = "adapters"


@build_command
@click.command("adapt")
@click.option("--backbone", default="efficientnet-lite0", show_default=True,
              help="Frozen backbone: efficientnet-lite0, a GMBINet checkpoint, or a ResNet-50 state_dict file.")
@click.option("--task", required=True, help="Name of the new task (letters, digits, . _ -).")
@click.option("--data", required=True, type=click.Path(), help="Class folders (DIR/<class>/*) or an SD-Saliency-900 folder.")
@click.option("--classes", default=None, help="Comma-separated class folders to use (default: all).")
@click.option("--rehearsal", default=20, show_default=True, type=int, help="Exemplars kept per class for later tasks.")
@click.option("--distill", default=1.0, show_default=True, type=float,
              help="Weight of the MSE between the new and the previous adapter's fused embedding (0: off).")
@click.option("--setting", type=click.Choice(["class-incremental", "task-incremental"]), default="class-incremental",
              show_default=True)
@click.option("--registry", default=DEFAULT_REGISTRY, show_default=True, type=click.Path(), help="Adapter registry folder.")
@click.option("--epochs", default=30, show_default=True, type=int)
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--fc-dim", default=160, show_default=True, type=int, help="Fused embedding width (first task only).")
@click.option("--cache", default=None, type=click.Path(), help="Feature cache folder (default: REGISTRY/cache).")
@click.option("--holdout", default=0.0, show_default=True, type=click.FloatRange(0, 0.9),
              help="Leave out this fraction of each class (the fixed holdout_split, seed 0) for testing; "
                   "0.2 is the held-out part edgekit bench and benchmarks/mlff_neu.py test on.")
@click.option("--drift-holdout", default=0.1, show_default=True, type=click.FloatRange(0, 0.5),
              help="Keep this fraction of each class out of training to calibrate the drift (novelty) threshold "
                   "on: the 99th percentile of their out-of-distribution scores (0: calibrate on the training "
                   "images, which flags more new in-distribution images).")
@limit_option()
@threads_option()
@json_option
def adapt_cmd(backbone, task, data, classes, rehearsal, distill, setting, registry, epochs, seed, fc_dim, cache,
              holdout, drift_holdout, limit, threads, as_json):
    """Add a task to an adapter registry: a small MLFF adapter on a frozen backbone.

    DATA holds one folder per class; a folder named ``inbox`` is skipped (reserved: the unlabelled images an
    ``edgekit station --review DATA`` copied there; move them into DATA/<class>/ to label them). The adapter
    folder also gets drift.safetensors, the statistics a station flags novel images with."""
    from edgekit.models.backbones import load_backbone
    from edgekit.train.continual import add_task, task_data_from_folder

    set_threads(threads)
    names = [c.strip() for c in classes.split(",") if c.strip()] if classes else None
    if classes is not None and not names:
        raise EdgekitError("--classes is empty")
    td = task_data_from_folder(data, names)
    if holdout > 0:  # split every class of the folder, then keep the chosen ones: the same split whatever --classes
        from edgekit.data.datasets import ClassSample, holdout_split
        from edgekit.train.continual import TaskData

        full = task_data_from_folder(data)
        train, _ = holdout_split([ClassSample(p, y) for p, y in zip(full.paths, full.labels)], holdout, seed=0)
        keep = {full.classes.index(c): i for i, c in enumerate(td.classes)}
        td = TaskData([s.path for s in train if s.label in keep], [keep[s.label] for s in train if s.label in keep],
                      td.classes)
    td = td.limited(limit)  # after the holdout: a limit never reaches into the held-out part
    bb = load_backbone(backbone)
    r = add_task(registry, bb, task, td, setting=setting, rehearsal=rehearsal, distill=distill, epochs=epochs,
                 seed=seed, fc_dim=fc_dim, cache_dir=cache if cache else "default", drift_holdout=drift_holdout)
    r.pop("model")
    d = r.get("drift")
    if d:
        expect = (f"about {100 * d['expected_flag_rate']:.1f} % of new images of these classes expected" if
                  d["expected_flag_rate"] is not None else "more of new images of these classes: too few images to "
                  "hold some out (--drift-holdout)")
        note(f"drift: {d['method']}, threshold {d['threshold']:.4g} (the {d['percentile']:g}th percentile of "
             f"{d['calibrated_on']} {d['calibration']}: it flags {100 * d['calibration_flag_rate']:.1f} % of them; "
             f"{expect}), statistics of {d['fitted_on']} images, {d['bytes'] / 1024:.1f} KiB, {d['seconds']:.2f} s")
        if d.get("covers"):
            note(f"note: the drift statistics cover {d['covers']} (no rehearsal exemplars of the earlier ones, "
                 "--rehearsal 0): a station flags images of the others as novel")
    if as_json:
        echo_json(r)
        return
    click.echo(f"added task {task!r} ({', '.join(td.classes)}; {r['images']} images) to {registry}: "
               f"{r['trainable_parameters']:,} trainable parameters, trained in {r['train_seconds']:.1f} s, "
               f"adapter {r['adapter_bytes'] / 1024:.1f} KiB in {r['adapter_folder']}")


@click.command("adapters")
@click.option("--registry", default=DEFAULT_REGISTRY, show_default=True, type=click.Path())
@json_option
def adapters_cmd(registry, as_json):
    """List the tasks and adapters of a registry."""
    from edgekit.mlff.registry import Registry

    reg = Registry.open(registry)
    if as_json:
        echo_json(reg.meta)
        return
    rows = [(i + 1, t["task"], ", ".join(t["classes"]), t["images"], f"{t['trainable_parameters']:,}",
             f"{t['adapter_bytes'] / 1024:.1f} KiB", t["adapter"]) for i, t in enumerate(reg.tasks)]
    print_table(f"{registry}: {reg.meta['setting']} on {reg.meta['backbone']}",
                ["#", "task", "classes", "images", "trainable params", "adapter", "folder"], rows)


@click.command("classify")
@click.argument("images", nargs=-1, required=True, type=click.Path())
@click.option("--registry", "--adapters", "registry", default=DEFAULT_REGISTRY, show_default=True, type=click.Path(),
              help="Adapter registry folder, or a device's install root (edgekit update/install --root ROOT; "
                   "ROOT/current too): the adapter in service on the device's recorded backbone.")
@click.option("--backbone-artifact", default=None, type=click.Path(),
              help="Run the backbone from this compiled MLFF backbone artifact (edgekit compile REGISTRY ...) "
                   "instead of PyTorch (or of the device's recorded one); refused if it was compiled from "
                   "another backbone.")
@click.option("--task", default=None, help="Task-incremental: which task's head (default: the most confident).")
@threads_option()
@json_option
def classify_cmd(images, registry, backbone_artifact, task, threads, as_json):
    """Classify images with the backbone + the registry's newest adapter (or a device's adapter in service)."""
    from edgekit.data.images import expand_image_paths
    from edgekit.fleet.device import load_classifier

    set_threads(threads)
    files = expand_image_paths(images, recursive=True)
    clf = load_classifier(registry, backbone_artifact=backbone_artifact, threads=threads)
    preds = clf.predict(files, task)
    rows = [{"image": str(f), **p} for f, p in zip(files, preds)]
    if as_json:
        echo_json(rows)
        return
    for r in rows:
        t = f"[{r['task']}] " if "task" in r else ""
        click.echo(f"{r['image']}\t{t}{r['class']}\t{r['prob']:.3f}")


commands = [adapt_cmd, adapters_cmd, classify_cmd]
