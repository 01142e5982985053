#!/usr/bin/env bash
# Issue 15 part 2 and issue 21 part 3 as ONE script for an offline GPU machine (../shared/GPU.md: python3
# with torch + CUDA, nvcc, no PyCUDA, no TensorRT, nothing reachable). NOT YET RUN ON A GPU: written and
# dry-run on a CPU-only machine (see --dry-run).
#
# Steps, in this order of priority, each bounded by its own timeout and by what is left of BUDGET
# (default 540 s), so a failing or hanging step cannot eat the rest:
#   env      nvidia-smi, python/torch/CUDA/nvcc versions
#   deps     the Python packages the image lacks (click, rich, pytest, ...), from the carried wheels
#   pycuda   PyCUDA built offline from the carried source (GPU.md's recipe, about 95 s)
#   tests    the GPU tests: fused GMBI kernel vs float64 (shapes, batches, explicit plans, raw pointers),
#            the cuda-fused runner vs the float64 model on real SD-900 images, the torch GPU rows and
#            bench --device gpu's JSON
#   compile  edgekit compile --target cuda-fused of the published checkpoint, fp16 and fp32 in parallel
#            (verified on the GPU by the compile itself, parity in the manifest)
#   eval     IoU/MAE of PyTorch (GPU, TF32 off) and both artifacts on the carried test images; PASS when
#            each artifact's IoU is within 0.002 of PyTorch's
#   bench    one interleaved bench --device gpu: eager / CUDA graph / torch.compile fp32+fp16,
#            cuda-fused fp32+fp16, batch 1 and 32 (cuda-fused rows only where PyCUDA imports)
#   train    edgekit train recipes/gmbinet_sd900.yaml --profile gpu (512 px, the train split on the GPU,
#            bf16) from scratch with --budget = what the step may use (TRAIN_BUDGET at most); returns
#            train_best.pt (best val IoU; test metrics on the carried test images in its metrics) and
#            train_report.json
#   prune    edgekit prune of the published checkpoint at 0.25 and 0.5 (Taylor ranking, BN recalibration),
#            each fine-tuned with --finetune --profile gpu --budget (half of what is left each);
#            returns prune_0.25.pt and prune_0.50.pt (their JSON results are in the logs and the summary)
# Every step's output goes to OUT_DIR/logs. OUT_DIR then holds at most these 8 files (the device tool
# returns at most 8 files of 16 MiB; checkpoints are about 1 MB):
#   summary.txt  logs.tar.gz  bench_gpu.json  bench_gpu.png  train_best.pt  train_report.json
#   prune_0.25.pt  prune_0.50.pt
# (the bench's text table is in summary.txt and logs/bench_gpu.txt).
#
# First, on a machine with ../shared and the network:  python benchmarks/gpu_carry.py   (-> .gpu_carry/,
#   about 30 MB: the whole SD-900 train and val splits as lossless PNG, 50 test images, checkpoint, wheels)
# On the GPU machine, from the repository root:         bash benchmarks/gpu_check.sh
#   through the device tool: command "bash benchmarks/gpu_check.sh", carry [".gpu_carry"], timeout_s 590
#   (BUDGET + 50: the script stops its steps at BUDGET and packs its logs; $OUT is the output folder there).
#   The first call's BUDGET goes to env..bench; train and prune get what is left. When device time remains,
#   a second call: "BUDGET=<seconds left - 60> bash benchmarks/gpu_check.sh --only train,prune".
# Committing what comes back (never straight from the GPU machine):
#   - bench_gpu.json/png and the table: the GPU section of benchmarks/RESULTS.md (GPU name, commands,
#     what failed and was fixed);
#   - train_best.pt: evaluate it here on the CPU on the WHOLE test split (the GPU saw 50 test images):
#       edgekit eval train_best.pt --data ../shared/datasets/sd-saliency-900 --split test --json
#     and only if its test IoU beats the embedded default's (edgekit/assets/gmbinet_edgekit.pt, 0.745),
#     copy it to edgekit/assets/gmbinet_edgekit.pt, with the eval JSON and the report in RESULTS.md;
#   - prune_*.pt: the same CPU eval, then their Pareto rows through cpu-fused and OpenVINO
#     (benchmarks/prune_pareto.py).
# Options:
#   --dry-run       no GPU: run the CPU steps for real (env, deps check, PyTorch eval of the carried
#                   images, and train / prune on the CPU: the cpu-budget profile for DRY_TRAIN_BUDGET and
#                   tiny prune fine-tunes, which returns the same files) and, for the other GPU steps,
#                   `--help` of every command and pytest --collect-only
#   --only a,b      run only these steps (e.g. --only compile,eval,bench after a fix, --only train,prune
#                   for a second call; env and deps are implied when not --dry-run, pycuda only for
#                   tests/compile/eval/bench)
#   --out DIR       output folder (default: $OUT when set, else /tmp/gpu_check_out)
# Environment: BUDGET (seconds, default 540), BENCH_RESERVE (seconds the earlier steps leave for the
# bench, default 240), TRAIN_BUDGET (most seconds of training, default 360), PRUNE_DISTILL (distillation
# weight for the prune fine-tunes, default 0: off), PYTHON (default python3), GPU_CARRY (default
# .gpu_carry), MAX_AUTOTUNE=1 (adds torch.compile max-autotune rows: minutes per batch size),
# DRY_TRAIN_BUDGET (default 20s).
# Estimated on an H200 machine (not measured): env+deps 25 s, pycuda 95 s, tests 100 s, compile 70 s,
# eval 40 s, bench 200-250 s (four torch.compile compilations dominate), train: its budget + ~40 s,
# prune: ~40 s per ratio + its budget.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
DRY=0
ONLY=""
DEST="${OUT:-/tmp/gpu_check_out}"
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --only) ONLY="$2"; shift ;;
    --out) DEST="$2"; shift ;;
    -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "error: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
export PY="${PYTHON:-python3}"
export CARRY="${GPU_CARRY:-$REPO/.gpu_carry}"
export SHARED="$CARRY/shared"
export CKPT="$SHARED/checkpoints/gmbinet_sd900_official.pt"
export DATA="$SHARED/datasets/sd-saliency-900"
export SITE="${GPU_CHECK_SITE:-/tmp/gpu_check_site}"
export WORK="${GPU_CHECK_WORK:-/tmp/gpu_check_work}"
export LOGS="$DEST/logs" DEST
export EDGEKIT_SHARED="$SHARED" EDGEKIT_NO_PROGRESS=1 PYTHONUNBUFFERED=1 DRY REPO
export PYTHONPATH="$SITE:$REPO${PYTHONPATH:+:$PYTHONPATH}"
export EDGEKIT="$PY -m edgekit.cli"
BUDGET=${BUDGET:-540}
BENCH_RESERVE=${BENCH_RESERVE:-240}
START=$(date +%s)
mkdir -p "$LOGS" "$WORK"
: > "$DEST/summary.txt"
[ -f "$CKPT" ] && [ -f "$DATA/split.json" ] || {
  echo "error: $CARRY lacks the checkpoint or the SD-900 images: run python benchmarks/gpu_carry.py first" >&2; exit 2; }

# a later step on a fresh machine needs the packages again, and PyCUDA for the CUDA-kernel steps (quick when
# they are there; train and prune need no PyCUDA, so a second call does not spend 95 s building it)
if [ -n "$ONLY" ] && [ "$DRY" = 0 ]; then
  [[ ",$ONLY," =~ ,(tests|compile|eval|bench), ]] && ONLY="pycuda,$ONLY"
  ONLY="env,deps,$ONLY"
fi
wanted() { [ -z "$ONLY" ] || [[ ",$ONLY," == *",$1,"* ]]; }

# run_step NAME TIMEOUT FUNCTION: the function's output into logs/NAME.log, bounded by TIMEOUT and by
# what is left of BUDGET (keeping 15 s for the summary); one line per step in summary.txt.
run_step() {
  local name=$1 limit=$2 fn=$3 left rc t0 t1
  wanted "$name" || return 0
  left=$(( BUDGET - ($(date +%s) - START) - 15 ))
  # the speed table is what a cut-short run would miss most: earlier steps leave BENCH_RESERVE for it
  case "$name" in env|deps|pycuda|tests|compile|eval) wanted bench && left=$(( left - BENCH_RESERVE )) ;; esac
  # train leaves prune a share of what is left (PRUNE_RESERVE, default 40 % of it) when prune follows
  [ "$name" = train ] && wanted prune && left=$(( left - left * ${PRUNE_RESERVE:-40} / 100 ))
  [ "$limit" -gt "$left" ] && limit=$left
  if [ "$limit" -lt 10 ]; then
    printf '%-8s SKIPPED (budget spent)\n' "$name" | tee -a "$DEST/summary.txt"; return 0
  fi
  echo "== $name (at most ${limit}s, dry-run=$DRY)"
  t0=$(date +%s)
  # STEP_LIMIT: the step's own bound, for steps that size their work to it (train, prune)
  STEP_LIMIT=$limit timeout -k 10 "$limit" bash -c "$(declare -f "$fn" py_import); $fn" > "$LOGS/$name.log" 2>&1
  rc=$?
  t1=$(date +%s)
  [ $rc -eq 124 ] && echo "(timed out after ${limit}s)" >> "$LOGS/$name.log"
  printf '%-8s rc=%-3s %4ss  %s\n' "$name" "$rc" "$((t1 - t0))" "$(grep -v '^\s*$' "$LOGS/$name.log" | tail -n 1 | cut -c1-160)" \
    | tee -a "$DEST/summary.txt"
  tail -n 5 "$LOGS/$name.log"
  return 0
}

py_import() { "$PY" -c "import $1" 2>/dev/null; }

step_env() {
  date -u
  nvidia-smi || echo "nvidia-smi: not available here"
  nvidia-smi --query-gpu=name,driver_version,compute_cap,memory.total,clocks.max.sm --format=csv || true
  "$PY" --version
  "$PY" -c "import torch, numpy; print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'numpy', numpy.__version__);
print('device', torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0)) if torch.cuda.is_available() else print('torch sees no CUDA device')"
  command -v nvcc && nvcc --version | tail -n 2 || echo "nvcc: not on PATH"
  command -v g++ && g++ --version | head -n 1 || echo "g++: not on PATH"
  nproc; uname -m
  "$PY" -m pip list 2>/dev/null | grep -iE '^(torch|triton|numpy|onnx|onnxruntime|click|rich|pytest|pycuda|pillow|pyyaml|tqdm|tensorrt) ' || true
}

# import name -> the carried wheels it needs (installed only when the import fails)
step_deps() {
  local need=() mod
  declare -A WHEELS=([click]="click" [rich]="rich markdown_it_py mdurl pygments" [tqdm]="tqdm" [yaml]="pyyaml"
                     [PIL]="pillow" [pytest]="pytest pluggy iniconfig packaging pygments"
                     [pytools]="pytools platformdirs siphash24 typing_extensions" [mako]="mako markupsafe")
  for mod in click rich tqdm yaml PIL pytest pytools mako; do
    if py_import "$mod"; then echo "have $mod"; else echo "missing $mod"; need+=(${WHEELS[$mod]}); fi
  done
  local files=() w f
  for w in $(printf '%s\n' "${need[@]}" | sort -u); do
    f=$(ls "$CARRY"/whl/"$w"-*.whl 2>/dev/null | head -n 1)
    [ -n "$f" ] || { echo "error: no carried wheel for $w in $CARRY/whl"; exit 1; }
    files+=("$f")
  done
  if [ "$DRY" = 1 ]; then
    for f in "$CARRY"/whl/*.whl; do "$PY" -m zipfile -t "$f" >/dev/null || { echo "error: broken wheel $f"; exit 1; }; done
    echo "dry run: would install ${#files[@]} wheel(s) into $SITE: ${files[*]##*/}"; exit 0
  fi
  [ ${#files[@]} -eq 0 ] && { echo "nothing to install"; exit 0; }
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "${files[@]}" && echo "installed ${#files[@]} wheel(s) into $SITE"
}

# ../shared/GPU.md's offline PyCUDA build
step_pycuda() {
  local src; src=$(ls "$CARRY"/whl/pycuda-*.tar.gz 2>/dev/null | head -n 1)
  [ -n "$src" ] || { echo "error: no carried PyCUDA source in $CARRY/whl"; exit 1; }
  if [ "$DRY" = 1 ]; then
    tar tzf "$src" | grep '/configure.py$' >/dev/null && echo "dry run: $src holds configure.py; would build it against $(command -v nvcc || echo 'nvcc (absent here)')"
    exit 0
  fi
  if py_import pycuda.driver; then echo "PyCUDA already importable"; else
    command -v nvcc >/dev/null || { echo "error: nvcc is not on PATH: cannot build PyCUDA"; exit 1; }
    rm -rf "$WORK/pc" && mkdir -p "$WORK/pc" && tar xzf "$src" -C "$WORK/pc" || exit 1
    (cd "$WORK"/pc/pycuda-* && "$PY" configure.py --cuda-root="$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")" >/dev/null &&
      "$PY" -m pip install -q --no-build-isolation --no-deps --no-index --target "$SITE" .) || exit 1
  fi
  "$PY" -c "import pycuda.driver as d; d.init(); print('PyCUDA', __import__('pycuda').VERSION_TEXT, 'CUDA', d.get_version(), 'driver', d.get_driver_version(), d.Device(0).name())"
}

GPU_TESTS="tests/test_kernels.py::test_fused_kernel_matches_reference tests/test_kernels.py::test_fused_kernel_explicit_plans
tests/test_kernels.py::test_fused_kernel_raw_pointers_on_a_stream tests/test_cuda_fused.py::test_runner_on_gpu_matches_pytorch
tests/test_trt_gpu.py::test_torch_gpu_rows_match_cpu tests/test_trt_gpu.py::test_bench_gpu_json"
export GPU_TESTS
step_tests() {
  if [ "$DRY" = 1 ]; then
    "$PY" -m pytest -p no:cacheprovider --collect-only -q $GPU_TESTS | tail -n 3; exit "${PIPESTATUS[0]}"
  fi
  "$PY" -m pytest -p no:cacheprovider -q -s -rfEs $GPU_TESTS
}

step_compile() {
  if [ "$DRY" = 1 ]; then $EDGEKIT compile --help | sed -n '1,3p'; exit "${PIPESTATUS[0]}"; fi
  local p pids=() rc=0
  for p in fp16 fp32; do
    $EDGEKIT compile "$CKPT" --target cuda-fused --precision "$p" --out "$WORK/cuda-fused-$p" --parity-data "$DATA" \
      --force --json > "$LOGS/compile_$p.json" 2> "$LOGS/compile_$p.err" &
    pids+=($!)
  done
  for p in "${pids[@]}"; do wait "$p" || rc=1; done
  for p in fp16 fp32; do
    echo "--- $p"; tail -n 3 "$LOGS/compile_$p.err"
    "$PY" -c "import json,sys; m=json.load(open(sys.argv[1])); print('parity', json.dumps(m.get('parity')), 'kernels', json.dumps(m.get('kernels')))" \
      "$LOGS/compile_$p.json" 2>/dev/null || echo "no manifest for $p"
  done
  exit $rc
}

step_eval() {
  if [ "$DRY" = 1 ]; then  # the CLI's PyTorch eval on the CPU, on a few images: the carried data loads
    $EDGEKIT eval "$CKPT" --data "$DATA" --split test --limit 6 --json --out "$LOGS/eval_torch.json" > /dev/null || exit 1
    $EDGEKIT eval --help | sed -n '1,3p'
    "$PY" -c "import json,sys; r=json.load(open(sys.argv[1]))['overall']; print('dry run: PyTorch on the carried images: IoU %.4f MAE %.4f (%d images)' % (r['iou'], r['mae'], r['images']))" "$LOGS/eval_torch.json"
    exit $?
  fi
  # the reference: PyTorch eager fp32 on the GPU with TF32 off (true fp32, as the CPU would give)
  "$PY" - "$CKPT" "$DATA" "$LOGS/eval_torch.json" <<'EOF' || exit 1
import json, sys
import torch
from edgekit.backends.torch_eager import TorchGpuRunner
from edgekit.data.datasets import open_segmentation
from edgekit.eval.evaluate import evaluate
from edgekit.models.checkpoint import load_checkpoint
torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
runner = TorchGpuRunner(load_checkpoint(sys.argv[1]), "eager", "fp32")
acc = evaluate(runner, open_segmentation(sys.argv[2], "test"), batch_size=1, show_progress=False)
open(sys.argv[3], "w").write(json.dumps(acc, indent=1))
EOF
  local p pids=() rc=0
  for p in fp16 fp32; do
    $EDGEKIT eval "$WORK/cuda-fused-$p" --data "$DATA" --split test --json --out "$LOGS/eval_cuda-fused-$p.json" > /dev/null \
      2> "$LOGS/eval_cuda-fused-$p.err" &
    pids+=($!)
  done
  for p in "${pids[@]}"; do wait "$p" || rc=1; done
  "$PY" - "$LOGS" <<'EOF' || rc=1
import json, sys
from pathlib import Path
logs = Path(sys.argv[1])
ref = json.loads((logs / "eval_torch.json").read_text())["overall"]
print(f"PyTorch fp32 (GPU, TF32 off)  IoU {ref['iou']:.4f}  MAE {ref['mae']:.4f}  ({ref['images']} images)")
ok = True
for p in ("fp16", "fp32"):
    f = logs / f"eval_cuda-fused-{p}.json"
    if not f.is_file():
        print(f"cuda-fused {p}  no result (see eval_cuda-fused-{p}.err)"); ok = False; continue
    r = json.loads(f.read_text())["overall"]
    d = r["iou"] - ref["iou"]
    good = abs(d) <= 0.002
    ok &= good
    print(f"cuda-fused {p}  IoU {r['iou']:.4f}  MAE {r['mae']:.4f}  IoU - PyTorch {d:+.4f}  {'PASS' if good else 'FAIL'} (|d| <= 0.002)")
sys.exit(0 if ok else 1)
EOF
  exit $rc
}

step_bench() {
  local rows="eager:fp32,eager:fp16,graph:fp32,graph:fp16,compile:fp32,compile:fp16"
  if [ "$DRY" = 1 ]; then $EDGEKIT bench --help | sed -n '1,3p'; exit "${PIPESTATUS[0]}"; fi
  py_import pycuda.driver && rows="$rows,cuda-fused:fp32,cuda-fused:fp16" || echo "PyCUDA does not import: no cuda-fused rows"
  local extra=(); [ "${MAX_AUTOTUNE:-0}" = 1 ] && extra+=(--max-autotune)
  echo "$EDGEKIT bench $CKPT --device gpu --backends $rows --batch 1,32 --data $DATA --eval-limit 8 --rounds 5 --iters 20"
  $EDGEKIT bench "$CKPT" --device gpu --backends "$rows" --batch 1,32 --data "$DATA" --eval-limit 8 --rounds 5 \
    --iters 20 "${extra[@]}" --json "$DEST/bench_gpu.json" --plot "$DEST/bench_gpu.png" > "$LOGS/bench_gpu.txt"
  local rc=$?
  cat "$LOGS/bench_gpu.txt"
  exit $rc
}

# The gpu profile from scratch: --budget = the step's bound less the start-up (imports, decoding the
# split, CUDA context) and the copy-out; best.pt and report.json come back.
step_train() {
  local profile=gpu budget=$(( STEP_LIMIT - 45 )) cap=${TRAIN_BUDGET:-360}
  [ "$budget" -gt "$cap" ] && budget=$cap
  if [ "$DRY" = 1 ]; then profile=cpu-budget; budget=${DRY_TRAIN_BUDGET:-20s}; else budget=${budget}s; fi
  [ "$DRY" = 1 ] || [ "${budget%s}" -ge 30 ] || { echo "error: ${budget} left: too little to train"; exit 1; }
  rm -rf "$WORK/train"
  echo "$EDGEKIT train recipes/gmbinet_sd900.yaml --profile $profile --data $DATA --budget $budget --out $WORK/train"
  $EDGEKIT train recipes/gmbinet_sd900.yaml --profile "$profile" --data "$DATA" --budget "$budget" --out "$WORK/train" || exit 1
  cp "$WORK/train/best.pt" "$DEST/train_best.pt" && cp "$WORK/train/report.json" "$DEST/train_report.json" || exit 1
  "$PY" -c "import json,sys; r=json.load(open(sys.argv[1])); o=r['overall']; b=r['budget']
print('train: %s, %d iterations (best %d), val IoU %.4f, test IoU %.4f on %d carried test images, %.0f s of a %.0f s budget (%s)' % (r['device'], r['iterations'], r['best_iteration'], r['val_iou'], o['iou'], o['images'], r['train_wall_s'], b['budget_s'], b['ended_by']))" "$DEST/train_report.json"
}

# Prune-finetune the published checkpoint at 0.25 and 0.5, each with half of what is left (the second one
# gets what the first did not use).
step_prune() {
  local ratio tag budget rc=0 t0=$(date +%s) left extra=()
  [ "${PRUNE_DISTILL:-0}" != 0 ] && extra+=(--distill "$PRUNE_DISTILL")
  for ratio in 0.25 0.5; do
    tag=$(printf '%.2f' "$ratio")
    left=$(( STEP_LIMIT - ($(date +%s) - t0) ))
    if [ "$DRY" = 1 ]; then
      $EDGEKIT prune "$CKPT" --ratio "$ratio" --finetune recipes/gmbinet_sd900.yaml --profile cpu-budget --data "$DATA" \
        --budget 15s --limit 6 --bn-images 8 --taylor-images 4 "${extra[@]}" --out "$DEST/prune_$tag.pt" --force \
        --json > "$LOGS/prune_$tag.json" || rc=1
    else
      [ "$ratio" = 0.25 ] && budget=$(( left / 2 - 50 )) || budget=$(( left - 60 ))
      [ "$budget" -ge 30 ] || { echo "prune $ratio: ${budget}s left: too little to fine-tune"; rc=1; continue; }
      echo "$EDGEKIT prune $CKPT --ratio $ratio --finetune recipes/gmbinet_sd900.yaml --profile gpu --budget ${budget}s"
      $EDGEKIT prune "$CKPT" --ratio "$ratio" --finetune recipes/gmbinet_sd900.yaml --profile gpu --data "$DATA" \
        --budget "${budget}s" "${extra[@]}" --out "$DEST/prune_$tag.pt" --force --json > "$LOGS/prune_$tag.json" || rc=1
    fi
    "$PY" -c "import json,sys; r=json.load(open(sys.argv[1])); f=r['finetune']; t=f['test']
print('prune %s: widths %s, %d iterations, val IoU %.4f, test IoU %.4f (%d carried test images), %.0f s' % (sys.argv[2], r['widths_after'], f['iterations'], f['val_iou'], t['iou'], t['images'], f['wall_s']))" \
      "$LOGS/prune_$tag.json" "$ratio" || rc=1
  done
  exit $rc
}

if [ "$DRY" = 1 ]; then echo "dry run: GPU steps show their commands' --help / collect their tests only"; fi
run_step env 30 step_env
run_step deps 60 step_deps
run_step pycuda 240 step_pycuda
run_step tests 200 step_tests
run_step compile 200 step_compile
run_step eval 120 step_eval
run_step bench 400 step_bench
run_step train 420 step_train
run_step prune 400 step_prune
{
  echo; echo "total $(( $(date +%s) - START ))s of BUDGET ${BUDGET}s; dry-run=$DRY; $(date -u)"
  [ -f "$LOGS/eval.log" ] && { echo; echo "--- eval"; cat "$LOGS/eval.log"; }
  [ -f "$LOGS/tests.log" ] && { echo; echo "--- tests (tail)"; tail -n 25 "$LOGS/tests.log"; }
  [ -f "$LOGS/bench_gpu.txt" ] && { echo; echo "--- bench"; cat "$LOGS/bench_gpu.txt"; }
  for f in "$LOGS"/prune_*.json; do [ -f "$f" ] && { echo; echo "--- ${f##*/}"; cat "$f"; }; done
} >> "$DEST/summary.txt"
tar czf "$DEST/logs.tar.gz" -C "$DEST" logs && [ -n "${OUT:-}" ] && [ "$DEST" = "$OUT" ] && rm -rf "$LOGS"
cat "$DEST/summary.txt"
