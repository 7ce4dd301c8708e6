#!/usr/bin/env bash
# The one command the device machine runs (issue 5): GPU tests, first-call compile cost,
# the benchmark suite, RESULTS.md + plot. Run from anywhere; it works in the repo root.
#
#   bash bench/gpu_run.sh                  # device tool: carry [".whl"] if diffusers wheels are there
#
# Everything lands in $OUT (default ./out): gpu_tests.log, first_call.jsonl, bench.log,
# bench.json, bench_records.jsonl, RESULTS.md, attention_bench.png (7 files; the device
# returns at most 8). Copy RESULTS.md and attention_bench.png into bench/ afterwards.
#
# Knobs (environment):
#   BENCH_QUICK=1     a subset of the suite (Flux 1024^2 and SD3 1024^2 only)
#   BENCH_K="expr"    pytest -k filter for the suite, e.g. "iidkern and flux_1024"
#   BENCH_REPS=N      timed calls per case (default 100; 50 with BENCH_QUICK)
#   SKIP_TESTS=1      skip the GPU tests;  SKIP_FIRST_CALL=1  skip the cold/warm compile runs
#   TEST_CAP=150      seconds for the GPU tests;  TOTAL_CAP=560  seconds for the whole script
#                     (the device kills a command at 600 s; the suite gets what is left)
set -u -o pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-$ROOT/out}
mkdir -p "$OUT"
rm -f "$OUT/bench_records.jsonl" "$OUT/first_call.jsonl" "$OUT/bench.json"  # appended to below
export PYTHONUNBUFFERED=1
START=$(date +%s)
TOTAL_CAP=${TOTAL_CAP:-560}
TEST_CAP=${TEST_CAP:-150}
RENDER_RESERVE=45
left() { echo $(( TOTAL_CAP - ($(date +%s) - START) )); }
stamp() { echo "== [$(( $(date +%s) - START )) s] $*"; }

stamp "device"
nvidia-smi || echo "nvidia-smi failed"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm,temperature.gpu,power.draw \
  --format=csv 2>/dev/null

# Packages the device image lacks (diffusers and its missing needs), carried as wheels.
if compgen -G ".whl/*.whl" > /dev/null; then
  stamp "installing carried wheels: $(ls .whl | tr '\n' ' ')"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl || { echo "wheel install failed"; exit 1; }
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}  # iidkern and bench from this checkout

stamp "versions"
python3 - <<'EOF'
import importlib
import torch
print("python", __import__("sys").version.split()[0], "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| cudnn", torch.backends.cudnn.version(), "| gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else None)
for name in ("triton", "pytest_benchmark", "matplotlib", "diffusers", "transformers", "huggingface_hub", "zipp"):
    try:
        print(f"  {name} {getattr(importlib.import_module(name), '__version__', '?')}")
    except Exception as e:  # a missing package is reported, not fatal
        print(f"  {name} unavailable: {type(e).__name__}: {e}")
EOF

TESTS_SUMMARY="not run"
if [ "${SKIP_TESTS:-0}" = 0 ]; then
  # The fuzz draws anew each run: its seed is printed, and HYPOTHESIS_SEED=N draws that run's calls again.
  HYPOTHESIS_SEED=${HYPOTHESIS_SEED:-$(( $(date +%s) % 100000 ))}
  stamp "GPU tests (cap ${TEST_CAP} s, hypothesis seed ${HYPOTHESIS_SEED})"
  timeout -s INT -k 15 "$TEST_CAP" python3 -m pytest -m cuda tests -x -q -p no:cacheprovider \
    --hypothesis-seed="$HYPOTHESIS_SEED" > "$OUT/gpu_tests.log" 2>&1
  rc=$?
  tail -n 25 "$OUT/gpu_tests.log"
  TESTS_SUMMARY=$(grep -E " in [0-9.]+s" "$OUT/gpu_tests.log" | tail -n 1 | tr -d '=' | sed 's/^ *//; s/ *$//')
  [ "$rc" = 124 ] && TESTS_SUMMARY="${TESTS_SUMMARY:-no summary} (stopped at the ${TEST_CAP} s cap)"
  TESTS_SUMMARY="${TESTS_SUMMARY:-no summary line (exit $rc)}"
fi

if [ "${SKIP_FIRST_CALL:-0}" = 0 ] && [ "$(left)" -gt 200 ]; then
  stamp "first-call cost: cold, then warm, in fresh processes sharing one Triton cache"
  FC_CACHE=$(mktemp -d)
  for label in cold warm; do
    TRITON_CACHE_DIR=$FC_CACHE timeout -k 10 120 python3 -m bench.first_call --label "$label" \
      --out "$OUT/first_call.jsonl" 2>&1 | tail -n 6
  done
fi

CAP=$(( $(left) - RENDER_RESERVE ))
if [ "${SKIP_BENCH:-0}" = 0 ] && [ "$CAP" -gt 30 ]; then
  stamp "benchmark suite (cap ${CAP} s, BENCH_QUICK=${BENCH_QUICK:-0})"
  # A fresh Triton cache, so each case's first_call_s shows real compile cost.
  K_ARGS=()
  [ -n "${BENCH_K:-}" ] && K_ARGS=(-k "$BENCH_K")
  TRITON_CACHE_DIR=$(mktemp -d) BENCH_RECORDS="$OUT/bench_records.jsonl" \
    timeout -s INT -k 20 "$CAP" python3 -m pytest bench/ --benchmark-only --benchmark-json="$OUT/bench.json" \
    -v --durations=25 -p no:cacheprovider --benchmark-columns=median,iqr,rounds --benchmark-sort=name ${K_ARGS[@]+"${K_ARGS[@]}"} \
    > "$OUT/bench.log" 2>&1
  rc=$?
  [ "$rc" = 124 ] && echo "benchmark suite stopped at its ${CAP} s cap; the records keep every finished case"
  grep -E "^(FAILED|ERROR)|Error" "$OUT/bench.log" | head -n 20
  tail -n 3 "$OUT/bench.log"
fi

stamp "GPU tests: $TESTS_SUMMARY"
stamp "render (summary last)"
python3 -m bench.render --json "$OUT/bench.json" --records "$OUT/bench_records.jsonl" \
  --first-call "$OUT/first_call.jsonl" --out "$OUT/RESULTS.md" --plot "$OUT/attention_bench.png" \
  --command "${BENCH_QUICK:+BENCH_QUICK=$BENCH_QUICK }${BENCH_K:+BENCH_K=\"$BENCH_K\" }bash bench/gpu_run.sh" \
  --tests-summary "$TESTS_SUMMARY" \
  --summary || echo "render failed"
stamp "done"
