"""Fill ``.gpu_carry/`` (git-ignored) with what ``benchmarks/gpu_check.sh`` needs on an offline GPU
machine, where ``../shared`` is absent:

    .gpu_carry/shared/checkpoints/gmbinet_sd900_official.pt      the published checkpoint
    .gpu_carry/shared/datasets/sd-saliency-900/                  the whole train and val splits (for the
                                                                 `train` and `prune` steps; images as
                                                                 lossless PNG: ~20 MB instead of 43) and N
                                                                 test images + masks, with a split.json
                                                                 whose lists are exactly those
    .gpu_carry/whl/                                              PyCUDA's source and the wheels (Python 3.12,
                                                                 manylinux x86-64) of what the GPU image may lack

``EDGEKIT_SHARED=.gpu_carry/shared`` then makes the tests' fixtures and the script find them as
they find ``../shared`` here. The images are taken evenly from ``split.json``'s test list of each
class (stratified, deterministic), so their accuracy is comparable between runs.

    python benchmarks/gpu_carry.py                 # 50 images + wheels (pip download: needs the network)
    python benchmarks/gpu_carry.py --no-wheels     # data only
    python benchmarks/gpu_carry.py --no-train-data # test images only (no train/prune steps there)
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYCUDA = "pycuda==2026.1"  # ../shared/GPU.md: seen building offline against CUDA 13 in ~95 s
# Binary wheels (no dependencies resolved: each needed one is named). PyCUDA's build and run needs,
# edgekit's install_requires other than torch/numpy, and pytest; gpu_check.sh installs only those
# whose import fails there.
WHEELS = ("pytools", "platformdirs", "mako", "markupsafe", "siphash24", "typing-extensions",
          "click", "rich", "markdown-it-py", "mdurl", "pygments", "tqdm", "pyyaml", "pillow",
          "pytest", "pluggy", "iniconfig", "packaging")
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64")


def pick_test_images(split: dict, count: int) -> list:
    """``count`` names from the test list, spread evenly over each class (name prefix In/Pa/Sc)."""
    test = list(split["test"])
    by_class: dict = {}
    for name in test:
        by_class.setdefault(name.split("_")[0], []).append(name)
    classes = sorted(by_class)
    picks = []
    for i, cls in enumerate(classes):
        names = by_class[cls]
        k = min(len(names), count // len(classes) + (1 if i < count % len(classes) else 0))
        picks += [names[j * len(names) // k] for j in range(k)]
    return picks


def _copy_image(src: Path, dst_dir: Path) -> None:
    """Copy an image, BMP as lossless PNG (the same pixels, about 40 % of the bytes)."""
    if src.suffix.lower() == ".bmp":
        from PIL import Image

        with Image.open(src) as im:
            im.save(dst_dir / f"{src.stem}.png", format="PNG", optimize=True)
    else:
        shutil.copy2(src, dst_dir / src.name)


def copy_data(shared: Path, out: Path, count: int, train_data: bool = True) -> list:
    ckpt = shared / "checkpoints" / "gmbinet_sd900_official.pt"
    sd = shared / "datasets" / "sd-saliency-900"
    for p in (ckpt, sd / "split.json"):
        if not p.is_file():
            raise SystemExit(f"error: {p} not found (the reference data in ../shared)")
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    shutil.copy2(ckpt, out / "checkpoints" / ckpt.name)
    split = json.loads((sd / "split.json").read_text())
    names = pick_test_images(split, count)
    train, val = (list(split["train"]), list(split["val"])) if train_data else ([], [])
    dst = out / "datasets" / "sd-saliency-900"
    if dst.exists():
        shutil.rmtree(dst)
    for sub in ("Source Images", "Ground truth"):
        (dst / sub).mkdir(parents=True)
    for n in [*train, *val, *names]:
        img = next(p for p in (sd / "Source Images" / f"{n}{e}" for e in (".bmp", ".png", ".jpg")) if p.is_file())
        _copy_image(img, dst / "Source Images")
        shutil.copy2(sd / "Ground truth" / f"{n}.png", dst / "Ground truth" / f"{n}.png")
    what = "the whole train and val splits and " if train_data else ""
    carried = {"test": names, "train": train, "val": val,
               "note": f"{what}{len(names)} images of the test split of ../shared's split.json, carried by "
                       f"benchmarks/gpu_carry.py (images as lossless PNG)"
                       + ("" if train_data else "; train/val are not carried")}
    if "classes" in split:
        carried["classes"] = split["classes"]
    (dst / "split.json").write_text(json.dumps(carried, indent=1) + "\n")
    return names


def download_wheels(dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(dest)]
    subprocess.run([*pip, PYCUDA], check=True)  # a source package only (PyPI has no PyCUDA wheels)
    plat = [a for p in PLATFORMS for a in ("--platform", p)]
    subprocess.run([*pip, "--only-binary", ":all:", "--python-version", "3.12", "--implementation", "cp", *plat,
                    *WHEELS], check=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shared", type=Path, default=Path(os.environ.get("EDGEKIT_SHARED", ROOT.parent / "shared")),
                    help="the reference data folder (default: $EDGEKIT_SHARED or ../shared)")
    ap.add_argument("--out", type=Path, default=ROOT / ".gpu_carry", help="the folder to fill (git-ignored)")
    ap.add_argument("--images", type=int, default=50, help="SD-900 test images to carry")
    ap.add_argument("--no-wheels", action="store_true", help="skip the pip downloads")
    ap.add_argument("--no-train-data", action="store_true",
                    help="carry no train/val images (gpu_check.sh's train and prune steps then fail at once)")
    args = ap.parse_args(argv)
    names = copy_data(args.shared, args.out / "shared", args.images, train_data=not args.no_train_data)
    print(f"{len(names)} SD-900 test images{'' if args.no_train_data else ', the train and val splits'} + the "
          f"published checkpoint -> {args.out / 'shared'}", file=sys.stderr)
    if not args.no_wheels:
        download_wheels(args.out / "whl")
        print(f"PyCUDA source + wheels -> {args.out / 'whl'}", file=sys.stderr)
    size = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file())
    print(f"{args.out}: {size / 2 ** 20:.1f} MiB (the device tool carries at most 64 MiB with the tree)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
