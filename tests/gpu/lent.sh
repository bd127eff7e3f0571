#!/usr/bin/env bash
# The one prepared run for a lent GPU (about 15 minutes of device time in all): tests/gpu first, then the
# one-device fp16 figures and layer profiles of sd15, sdxl and flux-small that `tandem plan` needs (one_device_figures.py), each step
# bounded so that one failing step leaves time for the rest. Everything lands in $OUT (the device runner's folder;
# /tmp/tandem-gpu elsewhere): paste its summary.txt into the stop note.
#
#   bash tests/gpu/lent.sh            # from the repository root, torch with CUDA installed
set -u
OUT=${OUT:-/tmp/tandem-gpu}
mkdir -p "$OUT"
export OUT PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
step() {  # step NAME SECONDS COMMAND...: runs it bounded, its output in $OUT/NAME.txt, one line in summary.txt
  local name=$1 limit=$2; shift 2
  local started=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.txt" 2>&1
  local rc=$?
  echo "$name: rc $rc in $((SECONDS - started)) s: $(tail -n 1 "$OUT/$name.txt")" | tee -a "$OUT/summary.txt"
}
: >"$OUT/summary.txt"
step devices 60 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
step torch 60 python3 -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0))"
step tests-gpu 240 python3 -m pytest tests/gpu -q -p no:cacheprovider -s
step one-device-figures 300 python3 tests/gpu/one_device_figures.py sd15 sdxl flux-small
for model in sd15 sdxl flux-small; do  # the plan's own measure of each model on the lent card
  step "plan-$model" 60 python3 -m parallel_backend plan --model "$model" --devices cuda:0 --json "$OUT/plan-$model.json"
done
cat "$OUT/summary.txt"
