#!/usr/bin/env bash
# The GPU proof in one command (issue 12): tests, benchmarks and the planner's memory check,
# each step time-boxed, then a one-page SUMMARY.md with every figure the acceptance list needs.
#
#   source .gpu/env.sh && bash benchmarks/gpu_proof.sh --out $OUT/proof     # on the GPU machine
#   bash benchmarks/gpu_proof.sh --skip-tests                               # anywhere: the CPU harness
#
# Options:
#   --out DIR      where results go (default benchmarks/results/<gpu>-<date>/, -2, -3... if taken);
#                  an explicit DIR must be empty or absent: earlier results are never overwritten
#   --with-8b      also the 8B GPU tests and the planner on the 8B shape (up to 7 more minutes)
#   --skip-tests   skip the pytest steps (the CPU test of this script does)
#   --only STEPS   run only these steps (comma-separated names below), e.g. a rerun of the failed ones
#   --deadline S   the whole proof ends within S seconds of its start: each step's budget is cut to
#                  the time left (the summary's kept back), and a step with under 15 s left is skipped
#
# Steps, in this order; each runs under `timeout` with the budget below (seconds), a failed or timed-out
# step is recorded (exit status, its log in logs/) and the next one still runs. At its budget a step
# gets SIGINT (pytest then still writes the XML of the tests that ran; plan_check keeps the setups
# it measured), then SIGKILL 15 s later. Budgets can be changed with an environment variable, e.g.
# BUDGET_tests_gpu=400. The measurements come first and the tests after them: a GPU is lent for
# about 15 minutes, and the speed the project exists for is what must be measured if time runs out
# (run with --deadline); the CPU suite runs last, since CI runs it on every change anyway.
#   step                  GPU    what
#   env                    10    nvidia-smi, GPU name, driver, library versions -> env.json, nvidia-smi.txt
#   bench-synthetic       180    fastft bench benchmarks/bench.toml, rows unsloth,hf,hf-stock, 10 + 20 steps
#   bench-dataset-packed  160    fastft bench benchmarks/alpaca.toml --workload dataset, unsloth,hf, 5 + 15 steps
#   bench-dataset-padded  160    the same with data.packing=false (same examples, same order)
#   planner               150    benchmarks/plan_check.py on the 1B shape, hf and unsloth, the whole card
#                                and a simulated 12 GiB card: predicted vs measured peak memory
#   tests-gpu             240    python -m pytest -m "gpu and not gpu_8b" (1B), one worker per test file
#                                (pytest-xdist, where installed) -> tests-gpu.xml
#   tests-cpu             600    python -m pytest -q -m "not gpu" (the whole CPU suite) -> tests-cpu.xml
#   tests-gpu-8b          240    --with-8b only: -m gpu_8b -> tests-gpu-8b.xml
#   planner-8b            180    --with-8b only: the same on the 8B shape on a simulated 16 GiB card
#   summary                15    benchmarks/proof_summary.py -> SUMMARY.md
# Without a GPU every step runs on fastft:tiny with a few steps (a few minutes on 2 cores) and
# SUMMARY.md says it is a CPU harness run, not a performance result.
#
# ALPACA_JSON=FILE uses another Alpaca-format file for the dataset steps (the CPU test's small one);
# DATASET_BACKENDS=unsloth runs them on fewer backends (default unsloth,hf), when GPU time is short.
# Testing hook: GPU_PROOF_FAIL=step[,step] makes the named steps fail on purpose (exit 3), to check
# that a failure is recorded and the later steps still run (tests/test_gpu_proof.py).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}

usage() { sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; echo "(steps and budgets: the comments at the top of $0)"; }
OUT="" WITH_8B=0 SKIP_TESTS=0 ONLY="" DEADLINE=""
while [ $# -gt 0 ]; do
  case "$1" in
    --out) [ $# -ge 2 ] || { echo "error: --out needs a folder" >&2; exit 2; }; OUT=$2; shift 2 ;;
    --out=*) OUT=${1#--out=}; shift ;;
    --with-8b) WITH_8B=1; shift ;;
    --skip-tests) SKIP_TESTS=1; shift ;;
    --only) [ $# -ge 2 ] || { echo "error: --only needs step names" >&2; exit 2; }; ONLY=$2; shift 2 ;;
    --only=*) ONLY=${1#--only=}; shift ;;
    --deadline) [[ ${2:-} =~ ^[0-9]+$ ]] || { echo "error: --deadline needs whole seconds" >&2; exit 2; }
      DEADLINE=$2; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "error: unknown option $1 (options: --out DIR, --with-8b, --skip-tests, --only STEPS, --deadline S)" >&2; exit 2 ;;
  esac
done

ALL="env bench-synthetic bench-dataset-packed bench-dataset-padded planner tests-gpu tests-cpu tests-gpu-8b planner-8b summary"
for name in ${ONLY//,/ }; do
  [[ " $ALL " == *" $name "* ]] || { echo "error: --only $ONLY: unknown step $name (steps: $ALL)" >&2; exit 2; }
done

export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1  # the GPU machine has no network

# GPU or CPU: what torch sees decides (CUDA_VISIBLE_DEVICES= forces the CPU harness).
DEVICE=$($PY -c "import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu')" \
  2>/dev/null | tail -n 1)
if [ -z "$DEVICE" ]; then echo "error: $PY cannot import torch; on the GPU machine start with: source .gpu/env.sh &&" >&2; exit 2; fi
MODE=gpu; [ "$DEVICE" = cpu ] && MODE=cpu

if [ -z "$OUT" ]; then
  slug=$(echo "$DEVICE" | tr 'A-Z' 'a-z' | sed -e 's/^nvidia //' -e 's/[^a-z0-9]\{1,\}/-/g' -e 's/^-//' -e 's/-$//')
  OUT="benchmarks/results/$slug-$(date -u +%Y-%m-%d)"
  n=2; base=$OUT
  while [ -e "$OUT" ]; do OUT="$base-$n"; n=$((n + 1)); done
elif [ -e "$OUT" ] && [ -n "$(ls -A "$OUT" 2>/dev/null)" ]; then
  echo "error: --out $OUT is not empty; the proof never overwrites earlier results. Pass a new folder, or move that one away." >&2
  exit 2
fi
mkdir -p "$OUT/logs" || exit 2
OUT=$(cd "$OUT" && pwd)

# The Alpaca set: $ALPACA_JSON if set (and then only it), else carried in .gpu/ to the GPU machine
# (../shared does not travel), else the shared copy.
ALPACA=""
for candidate in ${ALPACA_JSON:-.gpu/alpaca_5000.json ../shared/data/alpaca_5000.json}; do
  if [ -f "$candidate" ]; then ALPACA=$(cd "$(dirname "$candidate")" && pwd)/$(basename "$candidate"); break; fi
done

# Sizes per mode: the GPU run follows BENCHMARKING.md where the budget allows; the CPU harness
# only proves that every step runs (fastft bench falls back to fastft:tiny by itself on a CPU).
if [ $MODE = gpu ]; then
  SYN_STEPS="--warmup 10 --steps 20"
  DATA_STEPS="--warmup 5 --steps 15"
  PLAN_1B="--model random:llama-3.2-1b --budgets card,12 --steps 3"
  PLAN_8B="--model random:llama-3.1-8b --budgets 16 --steps 3"
else
  SYN_STEPS="--warmup 1 --steps 3"
  DATA_STEPS="--warmup 1 --steps 3 --batch-size 4 --seq-len 512"  # Alpaca's prompt alone is over 128 bytes
  PLAN_1B="--model fastft:tiny --budgets card,12 --steps 2"
  PLAN_8B="--model fastft:tiny --budgets 16 --steps 2"
fi
export ROOT PY OUT MODE ALPACA SYN_STEPS DATA_STEPS PLAN_1B PLAN_8B

# --------------------------------------------------------------------------- the steps

step_env() {
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi | tee "$OUT/nvidia-smi.txt" || return
  elif [ $MODE = gpu ]; then
    echo "nvidia-smi is missing although torch sees a GPU"; return 1
  else
    echo "no nvidia-smi here (CPU harness run)"
  fi
  $PY benchmarks/proof_env.py --mode $MODE > "$OUT/env.json" && cat "$OUT/env.json"
}

# The script's own CPU test is left out: it would run this whole harness again inside the proof.
step_tests_cpu() {
  $PY -m pytest -q -m "not gpu" --ignore=tests/test_gpu_proof.py --junitxml="$OUT/tests-cpu.xml"
}

# junit_logging keeps what the tests print (the loss parity figures) in the XML for the summary.
# One xdist worker per test file: the files' GPU tests are independent and each uses a fraction of the card.
step_tests_gpu() {
  local parallel=""
  $PY -c "import xdist" 2>/dev/null && parallel="-n 3 --dist loadfile"
  $PY -m pytest -q -m "gpu and not gpu_8b" $parallel -o junit_logging=system-out --junitxml="$OUT/tests-gpu.xml"
}

step_tests_gpu_8b() {
  $PY -m pytest -q -m gpu_8b -o junit_logging=system-out --junitxml="$OUT/tests-gpu-8b.xml"
}

step_bench_synthetic() {
  $PY -m fastft bench benchmarks/bench.toml --backends unsloth,hf,hf-stock $SYN_STEPS --out "$OUT/bench-synthetic.json"
}

bench_dataset() {  # bench_dataset NAME [--set ...]
  if [ -z "$ALPACA" ]; then
    echo "alpaca_5000.json not found in .gpu/ nor ../shared/data/ (nor \$ALPACA_JSON): cp ../shared/data/alpaca_5000.json .gpu/"
    return 2
  fi
  local name=$1; shift
  $PY -m fastft bench benchmarks/alpaca.toml --workload dataset --backends "${DATASET_BACKENDS:-unsloth,hf}" \
    --set "data.path=$ALPACA" \
    "$@" $DATA_STEPS --out "$OUT/$name.json"
}
step_bench_dataset_packed() { bench_dataset bench-dataset-packed; }
step_bench_dataset_padded() {
  # Random order as the packed run (not length-grouped), so both train on the same batches.
  bench_dataset bench-dataset-padded --set data.packing=false --set data.group_by_length=false
}

plan_checks() {  # plan_checks SIZE ARGS...: both backends, each in its own process (Unsloth patches at import)
  local size=$1 rc=0; shift
  for backend in hf unsloth; do
    echo "--- $backend"
    $PY benchmarks/plan_check.py --backend $backend "$@" --out "$OUT/plan-$size-$backend.json" || rc=1
  done
  return $rc
}
step_planner() { plan_checks 1b $PLAN_1B; }
step_planner_8b() { plan_checks 8b $PLAN_8B; }

step_summary() {
  $PY benchmarks/proof_summary.py "$OUT" --mode $MODE
}

forced_failure() {
  echo "failing on purpose: GPU_PROOF_FAIL=$GPU_PROOF_FAIL names this step (a test hook)"
  return 3
}
export -f step_env step_tests_cpu step_tests_gpu step_tests_gpu_8b step_bench_synthetic bench_dataset \
  step_bench_dataset_packed step_bench_dataset_padded plan_checks step_planner step_planner_8b step_summary \
  forced_failure

# --------------------------------------------------------------------------- running them

FAILED=0
record() {  # record NAME STATUS EXIT SECONDS BUDGET NOTE
  printf '{"step": "%s", "status": "%s", "exit": %s, "seconds": %s, "budget_s": %s, "log": "logs/%s.log", "note": "%s"}\n' \
    "$1" "$2" "$3" "$4" "$5" "$1" "$6" >> "$OUT/steps.jsonl"
}

run_step() {  # run_step NAME GPU_BUDGET CPU_BUDGET
  local name=$1 var="BUDGET_${1//-/_}" budget
  budget=${!var:-$([ $MODE = gpu ] && echo "$2" || echo "$3")}
  if [ -n "$DEADLINE" ] && [ $name != summary ]; then  # keep the summary's budget back
    local left=$(( DEADLINE - ($(date +%s) - STARTED) - SUMMARY_BUDGET ))
    if [ $left -lt 15 ]; then skip_step $name "--deadline $DEADLINE: ${left} s left"; return; fi
    [ $left -lt $budget ] && budget=$left
  fi
  local fn="step_${name//-/_}" log="$OUT/logs/$name.log" start rc status
  [[ ",${GPU_PROOF_FAIL:-}," == *",$name,"* ]] && fn=forced_failure
  printf '[%s] %-21s (budget %3s s) ' "$(date -u +%H:%M:%S)" "$name" "$budget"
  start=$(date +%s)
  timeout --signal=INT --kill-after=15 "$budget" bash -c "$fn" > "$log" 2>&1
  rc=$?
  local took=$(( $(date +%s) - start ))
  case $rc in
    0) status=ok ;;
    124|137) status=timeout ;;
    *) status=failed ;;
  esac
  record "$name" $status $rc $took "$budget" ""
  echo "$status in $took s"
  if [ $status != ok ]; then
    FAILED=$((FAILED + 1))
    tail -n 8 "$log" | sed 's/^/    | /'
  fi
}

skip_step() {  # skip_step NAME WHY
  printf '[%s] %-21s skipped: %s\n' "$(date -u +%H:%M:%S)" "$1" "$2"
  record "$1" skipped null 0 0 "$2"
}

echo "fastft GPU proof on $DEVICE ($MODE mode) -> $OUT"
[ $MODE = cpu ] && echo "no GPU here: every step runs on fastft:tiny to test the harness; not a performance result"
[ -n "$ALPACA" ] && echo "Alpaca data: $ALPACA"
echo "{\"mode\": \"$MODE\", \"device\": \"$DEVICE\", \"with_8b\": $WITH_8B, \"skip_tests\": $SKIP_TESTS, \"started\": \"$(date -u +%Y-%m-%dT%H:%M:%SZ)\"}" > "$OUT/run.json"

step() {  # step NAME GPU_BUDGET CPU_BUDGET: run it unless an option leaves it out
  local name=$1
  if [ -n "$ONLY" ] && [ $name != summary ] && [[ ",$ONLY," != *",$name,"* ]]; then skip_step $name "not in --only"
  elif [ $SKIP_TESTS = 1 ] && [[ $name == tests-* ]]; then skip_step $name "--skip-tests"
  elif [ $WITH_8B = 0 ] && [[ $name == *-8b ]]; then skip_step $name "needs --with-8b"
  else run_step "$@"; fi
}
STARTED=$(date +%s) SUMMARY_BUDGET=$([ $MODE = gpu ] && echo 15 || echo 60)
step env 10 60
step bench-synthetic 180 180
step bench-dataset-packed 160 180
step bench-dataset-padded 160 180
step planner 150 180
step tests-gpu 240 120
step tests-cpu 600 900
step tests-gpu-8b 240 120
step planner-8b 180 180
step summary 15 60  # always
if [ -f "$OUT/SUMMARY.md" ]; then echo; cat "$OUT/SUMMARY.md"; echo "summary: $OUT/SUMMARY.md"; fi
echo "$FAILED step(s) failed"
[ $FAILED = 0 ]
