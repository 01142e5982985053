"""One-shot pruning of the published GMBINet with five Torch-Pruning channel rankings, each scored
on the SD-900 val split before and after BatchNorm recalibration (RESULTS.md section 6b).

    python benchmarks/prune_rankings.py 0.25    # the pruning ratio; about 4 min on 2 CPU cores

Exploratory: the rankings are Torch-Pruning's own importances (plus edgekit's GMBI-aware one), not
`edgekit prune`'s code path. The Taylor gradients here come from the first 16 train images (in
SD-900's class-sorted list: all inclusions) with the finetune profile's augmentation and BN in
train mode (dropout too: seeded here; the first exploratory run was not, see RESULTS); `edgekit prune --importance taylor` uses 32 class-balanced images and eval-mode BN.
"""
from __future__ import annotations

import copy
import sys

import torch
import torch_pruning as tp

from edgekit.compress.prune import GMBIAwareImportance, GMBIPruner, _prunable_copy, opaque_gmbi, widths_of
from edgekit.train.prune import recalibrate_on_dataset
from edgekit.data.datasets import open_segmentation
from edgekit.eval.evaluate import evaluate
from edgekit.models.checkpoint import Checkpoint, load_checkpoint
from edgekit.models.gmbinet import GMBI, GMBINet, GMBINetConfig
from edgekit.backends.torch_eager import TorchRunner
from edgekit.train.data import batch_generator, build_trainset, make_batch
from edgekit.train.losses import DeepSupervisionLoss
from edgekit.train.recipe import load_recipe

SD900 = "../shared/datasets/sd-saliency-900"
PUBLISHED = "../shared/checkpoints/gmbinet_sd900_official.pt"


def main() -> None:
    ratio = float(sys.argv[1]) if len(sys.argv) > 1 else 0.25
    torch.set_num_threads(1)
    ck = load_checkpoint(PUBLISHED)
    src = _prunable_copy(ck.build()).eval()
    val = open_segmentation(SD900, "val")
    train = open_segmentation(SD900, "train")

    def score(m) -> float:
        c = Checkpoint.from_model(m, preprocess=ck.preprocess)
        return evaluate(TorchRunner(c, threads=1), val, batch_size=4, show_progress=False)["overall"]["iou"]

    def run(name, imp, grads=False):
        work = copy.deepcopy(src)
        work.all_heads = True
        if grads:  # Taylor: gradients of the training loss on a few train images
            r = load_recipe("recipes/gmbinet_sd900.yaml", "finetune")
            ts = build_trainset(train, train.samples[:16], (512, 512))
            crit = DeepSupervisionLoss()
            work.train()  # dropout on: seeded so that a rerun draws the same masks
            torch.manual_seed(0)
            for it in range(2):
                x, y = make_batch(ts, torch.arange(it * 8, it * 8 + 8), r.augment, ck.preprocess, batch_generator(0, it))
                crit(work(x), y).backward()
            work.eval()
        heads = [getattr(work, f"conv_out{i}")[1] for i in range(1, 6)]
        with opaque_gmbi(work):
            tp.pruner.MetaPruner(work, torch.randn(1, 3, 64, 64), importance=imp, pruning_ratio=ratio,
                                 ignored_layers=heads, customized_pruners={GMBI: GMBIPruner()}).step()
        work.all_heads = None
        cfg = GMBINetConfig.from_dict({**src.config.to_dict(), "widths": widths_of(work),
                                       "head_width": work.DF1.conv[3].out_channels})
        m = GMBINet(cfg)
        m.load_state_dict(work.state_dict())
        m.eval()
        before = score(m)
        recalibrate_on_dataset(m, train, ck.preprocess, 200)
        print(f"{name}: stored BN {before:.4f}, recalibrated {score(m):.4f}", flush=True)

    print(f"unpruned {score(src):.4f}; ratio {ratio}", flush=True)
    run("taylor", tp.importance.GroupTaylorImportance(), grads=True)
    run("magnitude + GMBI weights", GMBIAwareImportance(p=2))
    run("magnitude", tp.importance.GroupMagnitudeImportance(p=2))
    run("BN scale", tp.importance.BNScaleImportance())
    run("LAMP", tp.importance.LAMPImportance(p=2))


if __name__ == "__main__":
    main()
