"""Journey (issue 19): your own images + masks folder -> fine-tune the published checkpoint -> compile ->
predict, as README.md's "Your own product" page says. The commands are read from that page's code block
and run one after another through the CLI as separate processes in a fresh folder, so the page and the
test cannot drift apart. Only paths (../shared, recipes/) and the training budget (20 s instead of
minutes) are substituted; the folder is 15 non-square images cut from SD-900 test images, each with its
mask beside it (x.jpg + x.png, or x.jpg + x_mask.png).

About a minute on 2 cores (52 s at load average 7-9): the 20 s budget, the published model's eval at
512x512, one OpenVINO compile with its parity check."""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from conftest import ROOT, SHARED

BUDGET = "20s"  # the page says minutes; this checks the hand-offs, not the accuracy


def edgekit(cwd: Path, *args, timeout: float = 300) -> subprocess.CompletedProcess:
    """``edgekit ARGS`` as a separate process (the CLI a user runs), in ``cwd``."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), EDGEKIT_NO_PROGRESS="1", EDGEKIT_CACHE=str(cwd / ".cache"),
               OMP_NUM_THREADS="2")
    r = subprocess.run([sys.executable, "-m", "edgekit.cli", *map(str, args)], cwd=cwd, env=env,
                       capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"edgekit {' '.join(map(str, args))} -> {r.returncode}\n{r.stderr[-3000:]}"
    return r


def page_commands() -> list:
    """The ``edgekit`` commands of README.md's "Your own product" code block, continuation lines joined."""
    text = (ROOT / "README.md").read_text()
    section = text.split("### Your own product", 1)[1].split("\n### ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1).replace("\\\n", " ")
    return [shlex.split(line) for line in block.splitlines() if line.startswith("edgekit ")]


def for_here(argv: list) -> list:
    """A page command with this checkout's paths and the short budget."""
    out = []
    for i, a in enumerate(argv[1:]):
        if a.startswith("../shared/"):
            a = str(SHARED / a[len("../shared/"):])
        elif a.startswith("recipes/"):
            a = str(ROOT / a)
        elif argv[i] == "--budget":  # argv[i] is the word before a (argv[1:] shifts by one)
            a = BUDGET
        out.append(a)
    return out


def own_folder(sd900: Path, folder: Path, n_per_class: int = 5) -> None:
    """Non-square 200x120 crops around each defect of SD-900 test images, mask beside image."""
    names = json.loads((sd900 / "split.json").read_text())["test"]
    folder.mkdir(parents=True)
    k = 0
    for cls in ("In", "Pa", "Sc"):
        for name in [n for n in names if n.startswith(cls + "_")][:n_per_class]:
            img = np.asarray(Image.open(sd900 / "Source Images" / f"{name}.bmp").convert("L"))
            mask = np.asarray(Image.open(sd900 / "Ground truth" / f"{name}.png").convert("L"))
            rows = np.where(mask.max(1) > 127)[0]
            top = min(max(int(rows.mean()) - 60 if len(rows) else 40, 0), 80)
            Image.fromarray(img[top:top + 120]).save(folder / f"part_{k:02d}.jpg", quality=95)
            mask_name = f"part_{k:02d}.png" if k % 2 == 0 else f"part_{k:02d}_mask.png"  # both layouts
            Image.fromarray(mask[top:top + 120]).save(folder / mask_name)
            k += 1


def test_own_folder_to_fine_tuned_deployed_model(tmp_path, sd900, published_ckpt):
    commands = page_commands()
    assert [c[1] for c in commands] == ["eval", "train", "compile", "predict", "eval"], commands
    work = tmp_path / "journey"
    own_folder(sd900, work / "my_product")
    evaluate_published, train, compile_, predict, evaluate_deployed = (for_here(c) for c in commands)

    # 1. the published model on the folder: 15 images (masks beside them are not images), stretch said once
    r = edgekit(work, *evaluate_published, "--json")
    before = json.loads(r.stdout)
    assert before["overall"]["images"] == 15
    assert len([l for l in r.stderr.splitlines() if "stretched" in l and "200x120" in l]) == 1, r.stderr

    # 2. fine-tune: the folder split by name, the start is the published checkpoint, the size and letterbox
    #    recorded in the checkpoint
    r = edgekit(work, *train, timeout=600)
    assert "split by file name into 11 train / 2 val / 2 test" in r.stderr, r.stderr
    assert "fine-tuning from" in r.stderr
    run = work / "runs" / "my_product"
    report = json.loads((run / "report.json").read_text())
    assert report["overall"]["images"] == 2  # the held-out test part
    i = train.index("--input-size")
    size = [int(v) for v in train[i + 1].split("x")]

    # 3. compile best.pt: the artifact is built for the trained size and letterbox, parity checked there
    edgekit(work, *compile_)
    manifest = json.loads((work / compile_[compile_.index("--out") + 1] / "manifest.json").read_text())
    assert manifest["preprocess"]["input_size"] == size and manifest["preprocess"]["resize"] == "letterbox"
    assert manifest["parity"]["input_size"] == size and manifest["parity"]["mask_iou_agreement"] > 0.99
    assert manifest["source"]["path"].endswith("best.pt")

    # 4. predict: a mask at the image's own size, nothing stretched
    r = edgekit(work, *predict)
    assert "stretched" not in r.stderr
    out = work / predict[predict.index("--out") + 1]
    assert np.asarray(Image.open(out / "part_00_mask.png")).shape == (120, 200)
    after = json.loads(edgekit(work, *evaluate_deployed, "--json").stdout)
    assert after["overall"]["images"] == 15 and 0 <= after["overall"]["iou"] <= 1
