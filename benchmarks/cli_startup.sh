#!/usr/bin/env bash
# CLI start-up: wall time of `edgekit --help`, `edgekit compile --help` and a refused
# `compile --out EXISTING` (an argument error), for two source trees, interleaved in rounds.
#   bash benchmarks/cli_startup.sh BASELINE_TREE CANDIDATE_TREE [ROUNDS]
# Prints one line per (command, tree): median / min / max seconds.
set -euo pipefail
base=$1; cand=$2; rounds=${3:-5}
PY=${PYTHON:-python}
work=$(mktemp -d); mkdir "$work/exists"; trap 'rm -rf "$work"' EXIT
for _ in $(seq "$rounds"); do
  for tree in "$base" "$cand"; do
    for c in "--help" "compile --help" "compile model.pt --target onnx --out $work/exists"; do
      s=$(date +%s.%N); (cd "$work" && PYTHONPATH=$tree $PY -m edgekit.cli $c >/dev/null 2>&1) || true; e=$(date +%s.%N)
      echo "$tree|${c/$work\//}|$(echo "$e - $s" | bc)"
    done
  done
done | $PY -c '
import collections, statistics, sys
d = collections.defaultdict(list)
for line in sys.stdin:
    tree, cmd, s = line.rstrip("\n").split("|"); d[(cmd, tree)].append(float(s))
for (cmd, tree), v in sorted(d.items()):
    print(f"{cmd:42s} {tree:28s} median {statistics.median(v):6.2f} s  min {min(v):6.2f}  max {max(v):6.2f}")'
