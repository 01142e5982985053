"""No silent minutes (issue 19, item 3): every long step of prune, adapt, quantize, compile --precision int8
and train shows progress on stderr (edgekit.progress: a bar with its stage name, count and ETA for a
loop over images, epochs or iterations; a stage line before and a "done in" line after an opaque library
call such as nncf.quantize), while stdout keeps only the result (--json: exactly one JSON document).

Each command runs through the CLI as a separate process on tiny inputs (a 64x64 random checkpoint,
synthetic images, a few iterations). stderr is a pipe here, not a terminal, so progress is forced on
with EDGEKIT_PROGRESS=1 (edgekit.progress shows it on a terminal only, unless forced); with
EDGEKIT_NO_PROGRESS=1 (which wins over EDGEKIT_PROGRESS) none of it appears."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT

RECIPE = ROOT / "recipes" / "gmbinet_sd900.yaml"
BAR = "%|"  # tqdm's bar: "stage:  40%|####      | 2/5 [00:01<00:01, ...]" (elapsed<remaining: the ETA)
TRAIN_BAR = re.compile(r"train: +\d+%\|.*\| \d+/2 ")  # the iteration bar (the other train bars are named)


def edgekit(cwd: Path, *args, progress: bool, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("EDGEKIT_NO_PROGRESS", "EDGEKIT_PROGRESS")}
    env.update(PYTHONPATH=str(ROOT), EDGEKIT_CACHE=str(cwd / ".cache"), OMP_NUM_THREADS="2",
               EDGEKIT_PROGRESS="1")  # forced on (stderr is a pipe) ...
    if not progress:
        env["EDGEKIT_NO_PROGRESS"] = "1"  # ... and NO_PROGRESS still turns it off
    r = subprocess.run([sys.executable, "-m", "edgekit.cli", *map(str, args)], cwd=cwd, env=env,
                       capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"edgekit {' '.join(map(str, args))} -> {r.returncode}\n{r.stderr[-3000:]}"
    return r


@pytest.fixture(scope="module")
def work(tmp_path_factory, tiny_ckpt):
    """A folder with the tiny checkpoint, a shrunk recipe (the tiny widths, 64x64, batch 2) and two class
    folders of four images each (for adapt)."""
    import shutil

    import yaml
    from PIL import Image

    w = tmp_path_factory.mktemp("progress")
    shutil.copy(tiny_ckpt, w / "model.pt")
    d = yaml.safe_load(RECIPE.read_text())
    d["model"].update(widths=[8, 16, 16, 24, 32], depths=[1, 1, 1, 1])
    prof = d["profiles"]["finetune"]
    prof["preprocess"]["input_size"] = [64, 64]
    prof["train"].update(batch=2, val_every=2, checkpoint_every=2, val_batch=4, threads=1)
    (w / "tiny.yaml").write_text(yaml.safe_dump(d, sort_keys=False))
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (w / "cls" / c).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 255, (48, 48), dtype=np.uint8)).save(w / "cls" / c / f"{i}.png")
    return w


# command -> (arguments, the stage names that must appear, whether it prints --json)
COMMANDS = {
    "prune": (["prune", "model.pt", "--ratio", "0.25", "--data", "synthetic:8", "--taylor-images", "4",
               "--bn-images", "4", "--finetune", "tiny.yaml", "--iterations", "2", "--limit-images", "4",
               "--out", "{out}.pt", "--json"],
              ["prune: taylor importance", "prune: BatchNorm recalibration", "prune: removing 0.25 of every stage's channels",
               "prune: check, source model", "prune: check, pruned model", "train: loading the train images",
               TRAIN_BAR, "train: validation", "train: test split"], True),
    "adapt": (["adapt", "--task", "t1", "--data", "cls", "--backbone", "model.pt", "--epochs", "3",
               "--registry", "{out}", "--json"],
              ["adapt: backbone features", "adapt: training the adapter"], True),
    "quantize": (["quantize", "model.pt", "--target", "openvino", "--calib", "synthetic:8", "--subset", "4",
                  "--val", "synthetic:4", "--max-drop", "1", "--parity-data", "synthetic:2", "--out", "{out}",
                  "--json"],
                 ["INT8: reading the calibration images", "export: PyTorch -> ONNX", "INT8: NNCF accuracy-controlled",
                  "INT8 budget: source model on --val", "INT8 budget: INT8 artifact on --val",
                  "parity: openvino int8 vs the source model"], True),
    "compile-int8": (["compile", "model.pt", "--target", "openvino", "--precision", "int8", "--calib", "synthetic:8",
                      "--subset", "4", "--parity-data", "synthetic:2", "--out", "{out}", "--json"],
                     ["INT8: reading the calibration images", "openvino: building the fp32 model",
                      "INT8: NNCF quantization", "parity: openvino int8 vs the source model"], True),
    "train": (["train", "tiny.yaml", "--profile", "finetune", "--data", "synthetic:8", "--iterations", "2",
               "--limit-images", "4", "--out", "{out}"],
              ["train: loading the train images", TRAIN_BAR, "train: validation", "train: test split"], False),
}


def _args(name: str, out: str) -> list:
    return [a.replace("{out}", out) for a in COMMANDS[name][0]]


def _shown(stage, stderr: str) -> bool:
    return bool(stage.search(stderr)) if isinstance(stage, re.Pattern) else stage in stderr


def _check_stdout(name: str, stdout: str) -> None:
    if COMMANDS[name][2]:
        json.loads(stdout)  # exactly one JSON document: nothing before or after it
        assert stdout.lstrip().startswith("{")
    else:  # train: its one result line
        lines = [l for l in stdout.splitlines() if l.strip()]
        assert len(lines) == 1 and lines[0].startswith("best.pt: "), stdout
    assert "\r" not in stdout and BAR not in stdout


@pytest.mark.parametrize("name", list(COMMANDS))
def test_long_steps_show_progress_on_stderr_and_stdout_keeps_only_the_result(work, name):
    r = edgekit(work, *_args(name, f"on-{name}"), progress=True)
    _check_stdout(name, r.stdout)
    missing = [str(s) for s in COMMANDS[name][1] if not _shown(s, r.stderr)]
    assert not missing, f"no progress for {missing} in:\n{r.stderr[-4000:]}"
    assert BAR in r.stderr  # counted steps are bars with a count and an ETA
    if name in ("quantize", "compile-int8", "prune"):  # an opaque library call: a line before, its duration after
        assert ": done in " in r.stderr and " s\n" in r.stderr


@pytest.mark.parametrize("name", list(COMMANDS))
def test_edgekit_no_progress_silences_it(work, name):
    r = edgekit(work, *_args(name, f"off-{name}"), progress=False)
    _check_stdout(name, r.stdout)
    shown = [str(s) for s in COMMANDS[name][1] if _shown(s, r.stderr)]
    assert not shown and BAR not in r.stderr and "\r" not in r.stderr and ": done in " not in r.stderr, r.stderr


def test_a_terminal_bar_keeps_moving_during_one_long_step():
    """On a terminal a bar is redrawn every second, so one slow step (a Taylor batch, one epoch) does not look
    like a hang: a 3 s step under a pseudo-terminal gets at least two redraws."""
    import fcntl
    import pty
    import select
    import struct
    import termios
    import time

    code = ("import time\nfrom edgekit.progress import progress\n"
            "with progress(1, 'slow step') as bar:\n    time.sleep(3)\n    bar.update(1)\n")
    env = {k: v for k, v in os.environ.items() if k not in ("EDGEKIT_NO_PROGRESS", "EDGEKIT_PROGRESS")}
    env["PYTHONPATH"] = str(ROOT)
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # a terminal 120 columns wide
    p = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.DEVNULL, stdout=slave, stderr=slave, env=env)
    os.close(slave)
    chunks, t_end = [], time.monotonic() + 60
    try:
        while time.monotonic() < t_end:
            if select.select([master], [], [], 0.5)[0]:
                try:
                    data = os.read(master, 4096)
                except OSError:  # the child closed the terminal
                    break
                if not data:
                    break
                chunks.append(data)
            elif p.poll() is not None:
                break
    finally:
        p.wait(timeout=30)
        os.close(master)
    out = b"".join(chunks).decode(errors="replace")
    assert p.returncode == 0, out
    redraws = [s for s in out.split("\r") if s.startswith("slow step:   0%")]
    assert len(redraws) >= 3, out  # the first draw and at least two heartbeats before the step ends
