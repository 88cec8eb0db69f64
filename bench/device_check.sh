#!/usr/bin/env bash
# The GPU check in one call of the `device` tool (bench/README.md, "On a lent GPU"):
#
#   run(command="bash bench/device_check.sh", carry=[".device/tokenizer"], timeout_s=570)
#
# On the lent machine (its own python3 with torch + CUDA; nothing can be installed from a registry)
# it builds the extension from source with its CUDA kernels, runs the op tests and the device-path
# tests on the GPU against their float64 references, then the benchmarks, most important first,
# each inside the time left (BUDGET_S, default 540 s, ends the script in time to bring the files
# back). Under $OUT: summary.md (also the last thing printed), build.log, tests.log, bench.log,
# bench.json (spd-bench/1, rows from every benchmark that finished) and README.md (bench/README.md
# with the GPU's tables). Back here: copy bench.json to bench/results/<its machine tag>.json and
# README.md over bench/README.md, and check the diff.
#
# Before the call, here: `bash bench/device_check.sh --prepare` puts the default model's tokenizer
# (3.5 MB; the device-path tests need one, and no model file travels) into .device/tokenizer
# (git-ignored through .git/info/exclude) and prints the call, with what it carries: the tokenizer,
# and the study's first model chunk where bench/device_study.sh --prepare has made them.
#
# A dry run of the flow on a CPU (no build, tiny sizes, the venv's python):
#   OUT=/tmp/device-out PY=.venv/bin/python DEVICE=cpu SIZES=tiny SKIP_BUILD=1 bash bench/device_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."

if [[ ${1:-} == --prepare ]]; then
  set -e
  grep -qx '/.device/' .git/info/exclude 2>/dev/null || echo '/.device/' >>.git/info/exclude
  rm -rf .device/tokenizer && mkdir -p .device/tokenizer
  ${PY:-.venv/bin/python} - <<'PY'
import json
import pathlib

from spd.models import DEFAULT_MODEL, load_tokenizer

tok = load_tokenizer(DEFAULT_MODEL)
tok.save_pretrained(".device/tokenizer")
# spd.models.load_tokenizer takes a transformers folder, which has a config.json
pathlib.Path(".device/tokenizer/config.json").write_text(json.dumps({"model_type": "llama"}))
print("prepared .device/tokenizer:", len(tok), "tokens")
PY
  # the call carries the working tree (tracked and untracked, not ignored) and these: 64 MiB at most
  carry=(.device/tokenizer)
  [[ -f .device/study/chunks.sha256 ]] && carry+=(.device/study/chunks.sha256 .device/study/chunks/00)
  mib=$(bash bench/device_tree.sh mib "${carry[@]}")
  if (( mib >= 60 )); then
    echo "the call would carry ${mib} MiB, over the device tool's 64 MiB (less a margin): move the study's" \
         "archive out of the tree for the call (bash bench/device_tree.sh stash; see its header)" >&2
    exit 1
  fi
  printf -v list '"%s", ' "${carry[@]}"
  echo "the call will carry ${mib} MiB of the device tool's 64 MiB:"
  echo "  run(command=\"bash bench/device_check.sh\", carry=[${list%, }], timeout_s=570)"
  exit 0
fi
[[ -d .device/tokenizer ]] && export SPD_TEST_TOKENIZER=$PWD/.device/tokenizer
# a chunk of the study's model carried along (bench/device_study.sh) goes to the machine's /tmp
[[ -f .device/study/chunks.sha256 ]] && bash bench/device_study.sh --receive

: "${OUT:?set OUT to the folder for the results (the device tool sets it)}"
PY=${PY:-python3}
DEVICE=${DEVICE:-cuda}
SIZES=${SIZES:-full}          # full | tiny (tiny: the benchmarks' --tiny sizes, to check the flow)
BUDGET_S=${BUDGET_S:-540}
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1 MAX_JOBS=${MAX_JOBS:-$(nproc)}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
mkdir -p "$OUT"
SUMMARY=$OUT/summary.md
BENCH_JSON=$OUT/bench.json
cp bench/README.md "$OUT/README.md"
: >"$OUT/bench.log"
t0=$SECONDS
failed=0

say() { echo "$*" | tee -a "$SUMMARY"; }
left() { echo $((BUDGET_S - (SECONDS - t0))); }
# step NAME CAP_S LOG COMMAND...: runs COMMAND under the smaller of CAP_S and the time left (minus a
# margin); skipped when under 20 s are left. Records status and seconds in the summary.
step() {
  local name=$1 cap=$2 log=$3; shift 3
  local budget=$(( $(left) - 15 )); (( budget > cap )) && budget=$cap
  if (( budget < 20 )); then say "| $name | skipped (time) | - |"; return 1; fi
  local start=$SECONDS rc
  echo "=== $name (at most ${budget} s) [$((SECONDS - t0)) s]" | tee -a "$log"
  timeout --kill-after=10 "$budget" "$@" >>"$log" 2>&1
  rc=$?
  local took=$((SECONDS - start)) status=ok
  (( rc == 124 || rc == 137 )) && status="timed out"
  (( rc != 0 && rc != 124 && rc != 137 )) && status="failed (exit $rc)"
  say "| $name | $status | ${took} s |"
  [[ $status == ok ]] || failed=1
  [[ $status == ok ]]
}

{
  echo "# Device check ($(date -u +%FT%TZ))"
  echo
  echo '```'
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv 2>&1 | head -3
  "$PY" -c "import torch, transformers, peft; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'| transformers', transformers.__version__, '| peft', peft.__version__, '| gpu', \
torch.cuda.get_device_name() if torch.cuda.is_available() else None)" 2>&1
  echo '```'
  echo
  echo "| step | result | wall |"
  echo "|---|---|---|"
} >"$SUMMARY"
cat "$SUMMARY"

# 1. build from source (the CUDA kernels when DEVICE is cuda)
if [[ -z ${SKIP_BUILD:-} ]]; then
  [[ $DEVICE == cuda* ]] && export SPD_BUILD_CUDA=1
  step build 300 "$OUT/build.log" "$PY" -m pip install --no-build-isolation --no-deps --no-cache-dir -e . \
    || { say ""; say "build failed: the end of build.log"; tail -40 "$OUT/build.log"; exit 1; }
fi
step doctor 60 "$OUT/build.log" "$PY" -m spd.cli doctor
grep -A1 "^extension:" "$OUT/build.log" | tail -2 | sed 's/^/    /' | tee -a "$SUMMARY"

# 2. correctness: the op tests and the end-to-end device paths (each against a float64 reference)
TESTS="tests/test_ext_loading.py tests/test_project_rows.py tests/test_capture_ops.py tests/test_rsvd_op.py"
[[ -f tests/test_device_paths.py ]] && TESTS="$TESTS tests/test_device_paths.py"
# shellcheck disable=SC2086
step tests 240 "$OUT/tests.log" "$PY" -m pytest -q -p no:cacheprovider -rs $TESTS
say "    $(grep -E '[0-9]+ (passed|failed)' "$OUT/tests.log" | tail -1)"

# 3. benchmarks, most important first; each merges its rows into bench.json
bench() {  # bench NAME CAP_S ARGS...
  local name=$1 cap=$2; shift 2
  local sizes=()
  [[ $SIZES == tiny ]] && sizes=(--tiny)
  step "bench $name${*:+ $*}" "$cap" "$OUT/bench.log" "$PY" -m spd.cli bench "$name" --device "$DEVICE" \
    --out "$BENCH_JSON" --readme "$OUT/README.md" "${sizes[@]}" "$@"
}
if [[ $SIZES == tiny ]]; then
  bench hooks 120
  bench capture 120
  bench svd 120
else
  bench hooks 170 --models qwen2.5-0.5b-shape --batches 1,8,32,64 --reps 3
  bench capture 100 --model qwen2.5-0.5b-shape --n 50 --reps 2
  bench svd 90 --rows 100000,1000000 --dims 512,4096
  bench hooks 130 --models llama-3.1-8b-shape --batches 1,32 --reps 2
fi

# 4. the tables (from bench.json), last so that the reply's tail holds them
"$PY" - "$BENCH_JSON" >>"$SUMMARY" 2>&1 <<'PY'
import json, sys
try:
    doc = json.load(open(sys.argv[1]))
except (OSError, ValueError) as exc:
    print(f"\nno benchmark results ({exc})"); sys.exit()
print(f"\nmachine: {doc['machine'].get('tag')}  {doc['machine'].get('gpu') or doc['machine'].get('cpu')}")
cols = {"hooks": ("model", "batch", "backend", "step_ms_median", "ratio_median", "tokens_per_s"),
        "capture": ("method", "n_examples", "total_s_median", "peak_mib_median", "speedup_vs_plain",
                    "max_angle_vs_plain_rad"),
        "svd": ("M", "d", "r", "method", "time_s_median", "peak_mib", "angle_rad")}
for name, entry in doc.get("benchmarks", {}).items():
    keys = cols.get(name, ())
    print(f"\n{name}:")
    for row in entry.get("rows", []):
        print("  " + "  ".join(f"{k}={row[k]:.4g}" if isinstance(row.get(k), float) else f"{k}={row.get(k)}"
                               for k in keys if k in row))
    for s in entry.get("skipped", []):
        print(f"  skipped: {s}")
PY
say ""
say "total: $((SECONDS - t0)) s; $( ((failed)) && echo 'SOME STEPS DID NOT FINISH (see the logs)' || echo 'every step ok')"
echo
cat "$SUMMARY"
exit $failed
