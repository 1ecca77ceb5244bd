#!/usr/bin/env bash
# The prepared run for a lent GPU (issue 19): everything in one go, figures to $OUT.
#
#   here:       bash ../shared/tools/device-prep.sh     (packs .device/: Deno, npm packages, Vulkan loader)
#   device:     run tool, carry [".device"], command: bash bench/device.sh
#   locally:    LOCAL=1 SHAPES=stories FORMATS=fp16,w4g128 bash bench/device.sh
#               (the same steps on this machine's adapter, e.g. lavapipe, with small shapes)
#
# Steps: install Deno and the Vulkan loader from .device/ (not with LOCAL=1), print the adapter
# (it must not be llvmpipe on the device), tune the kernels of every shape × format (the tuner
# cache goes to $OUT/tune.json and is used by the runs after it), `bench latency` at batch
# 1/8/32, `bench profile` of one decode step per format of the first shape, copying
# bench/RESULTS.md, bench/latency.json and the logs to $OUT after each step.
#
# Time: the whole run stays within TOTAL seconds (default 480, under the device tool's 600 s a
# call). Each step is bounded by `timeout`, by its own limit and by what is left of TOTAL less
# what the later steps are owed (the latency bench is owed LATENCY s, default 240), so one slow
# step cannot eat the others' time; a step with too little time left is skipped, and a failed
# one is logged and the script goes on. The first shape (7b by default) is tuned and measured
# first, so a run cut short still has the goals' shape. The tuner files each choice as it makes
# it and the latency bench records each row as it is measured: a step that times out keeps its
# finished part.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/lowbit-device-out}
mkdir -p "$OUT"
SHAPES=${SHAPES:-7b,1b}
TOTAL=${TOTAL:-480}
LATENCY=${LATENCY:-240}
FORMATS=${FORMATS:-fp16,w4g128,w3g128,w2g64}
BATCHES=${BATCHES:-1,8,32}
LOG="$OUT/device.log"
say() { echo "[$(date +%T)] $*" | tee -a "$LOG" >&2; }
save() { cp bench/RESULTS.md bench/latency.json "$OUT/" 2>/dev/null; true; }
step() { # step NAME SECONDS OWED CMD...: at most SECONDS, leaving OWED s of TOTAL for later steps
  local name=$1 limit=$2 owed=$3; shift 3
  local left=$((TOTAL - SECONDS - owed))
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt 15 ]; then
    say "$name: skipped, ${left} s left of TOTAL=$TOTAL after what later steps are owed"
    return 124
  fi
  say "$name (≤ $limit s): $*"
  local t0=$SECONDS
  timeout "$limit" "$@" > >(tee -a "$OUT/$name.out") 2> >(tee -a "$OUT/$name.err" >&2)
  local rc=$?
  say "$name: rc $rc in $((SECONDS - t0)) s"
  save
  return $rc
}

if [ -z "${LOCAL:-}" ]; then
  for f in .device/debs/*.deb; do dpkg -x "$f" /; done
  ldconfig
  rm -rf node_modules && cp -r .device/node_modules .
  python3 -c "import lzma,shutil; shutil.copyfileobj(lzma.open('.device/deno.xz'), open('/usr/local/bin/deno','wb'))"
  chmod +x /usr/local/bin/deno
  export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
  DENO=/usr/local/bin/deno
else
  DENO=./node_modules/.bin/deno
fi
export XDG_RUNTIME_DIR=/tmp LOWBIT_TUNE_CACHE="$OUT/tune.json"
R=("$DENO" run -A --no-check)

step adapter 60 "$LATENCY" "$DENO" eval 'const a = await navigator.gpu.requestAdapter(); const i = a?.info; console.log(i?.vendor, i?.architecture, i?.device, i?.description, "|", [...a?.features ?? []].join(" "))'
nvidia-smi --query-gpu=name,memory.total,clocks.max.memory --format=csv 2>/dev/null | tee -a "$LOG"

# the tuner takes one group size per run: W4/W3 at g128, W2 at g64 (the bench's formats)
rows=$(echo "$BATCHES" | tr ',' '\n' | grep -vx 1 | paste -sd, -)
for shape in ${SHAPES//,/ }; do
  case $shape in 1b|7b) ;; *) continue ;; esac # the tuner's synthetic shapes
  step "tune-$shape-g128" 150 "$LATENCY" "${R[@]}" runtime/cli/tune_cmd.ts --shapes "$shape" --bits 3,4 --group 128 --rows "${rows:-none}" --out "$OUT/tune.json"
  step "tune-$shape-g64" 100 "$LATENCY" "${R[@]}" runtime/cli/tune_cmd.ts --shapes "$shape" --bits 2 --group 64 --rows "${rows:-none}" --out "$OUT/tune.json"
done
step latency 600 0 "${R[@]}" bench/main.ts latency --shapes "$SHAPES" --formats "$FORMATS" --batches "$BATCHES" --prompts 512
for f in ${FORMATS//,/ }; do
  shape=${SHAPES%%,*}
  file=/tmp/lowbit-bench/$shape-$f.lowbit
  [ "$f" = fp16 ] && file=/tmp/lowbit-bench/$shape-f16
  [ "$f" = fp16 ] && [ "$shape" = stories ] && file=../shared/models/stories260K-hf
  [ -e "$file" ] && step "profile-$f" 60 0 "${R[@]}" bench/main.ts profile --model "$file" --reps 20
done
say "done in $SECONDS s; results in $OUT"
