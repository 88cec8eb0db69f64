#!/usr/bin/env bash
# The study's primary model (qwen2.5-coder-0.5b) on a lent GPU, with the `device` tool
# (bench/README.md, "The study on a lent GPU"). The model file (491 MB) does not fit one call (64 MiB
# travel), so it goes over in chunks into the machine's /tmp while the machine stays warm (30 s
# after each call: make the calls back to back), then one call runs the study there:
#
#   here:  bash bench/device_study.sh --prepare          # .device/study/: chunks, their sha256, data, gguf wheel
#   there: run(command="bash bench/device_study.sh --receive",
#              carry=[".device/study/chunks.sha256", ".device/study/chunks/00"])  # one call per chunk but the last
#   there: run(command="BUDGET_S=480 bash bench/device_study.sh", timeout_s=570,
#              carry=[".device/study/chunks.sha256", ".device/study/chunks/<last>", ".device/study/data",
#                     ".device/study/whl"])
#
# The last call puts the chunks together into spd's cache (spd checks the file's sha256), installs the
# carried gguf wheel (the image has transformers and peft, not gguf), and runs bench/study.py on the
# GPU (batches of BATCH rows, default 256; the runs ONLY names, default code, math then QA) under
# `timeout -s INT` at BUDGET_S seconds, so that a run cut short stops as after Ctrl-C. Finished runs go
# to the study archive bench/results/study-gpu/ (carried there as part of the tree, so a later call
# resumes) and come back under $OUT: archive.tar.aa, .ab, ... (15 MiB pieces), RESULTS-gpu.md,
# study.log and summary.md. Back here:
#   cat <files_at>/archive.tar.* | tar -x -C bench/results/
#   python bench/study.py --report --models qwen2.5-coder-0.5b --root runs/study-gpu \
#       --archive bench/results/study-gpu --doc docs/RESULTS-gpu.md --batch-size 256
#
# The working tree travels with every call: move the CPU study's archive (bench/results/study/) out of
# it for these calls and back after (bash bench/device_tree.sh stash / unstash; see its header);
# --prepare refuses chunks that would not fit beside the tree.
# A check of the flow here, without a GPU (the study's --dry-run instead of the runs):
#   bash bench/device_study.sh --prepare && OUT=/tmp/ds-out PY=.venv/bin/python DRY=1 bash bench/device_study.sh
set -uo pipefail
cd "$(dirname "$0")/.."

STUDY=.device/study
STAGE=${STAGE:-/tmp/spd-study}   # on the lent machine: chunks, spd's cache and the run folders
MODEL=qwen2.5-coder-0.5b

receive() {  # copy the carried chunks into $STAGE/chunks, checking each against chunks.sha256
  mkdir -p "$STAGE/chunks"
  local f
  for f in "$STUDY"/chunks/*; do
    [[ -f $f ]] || continue
    (cd "$STUDY/chunks" && grep " ${f##*/}\$" ../chunks.sha256 | sha256sum -c --quiet -) \
      || { echo "chunk ${f##*/} arrived damaged: send it again" >&2; return 1; }
    cp "$f" "$STAGE/chunks/"
  done
  local have want
  have=$(ls "$STAGE/chunks" | wc -l); want=$(wc -l <"$STUDY/chunks.sha256")
  echo "chunks on this machine: $have of $want ($(du -sh "$STAGE/chunks" | cut -f1))"
}

if [[ ${1:-} == --prepare ]]; then
  set -e
  PY=${PY:-.venv/bin/python}
  grep -qx '/.device/' .git/info/exclude 2>/dev/null || echo '/.device/' >>.git/info/exclude
  CHUNK_MIB=${CHUNK_MIB:-54}
  tree_mib=$(bash bench/device_tree.sh mib)
  if (( tree_mib + CHUNK_MIB > 62 )); then
    echo "the working tree is ${tree_mib} MiB: with ${CHUNK_MIB} MiB chunks a call would pass the device tool's" \
         "64 MiB. Move the CPU study's archive out of the tree for the calls (bash bench/device_tree.sh stash;" \
         "see its header), or set CHUNK_MIB lower (more calls)" >&2
    exit 1
  fi
  rm -rf "$STUDY" && mkdir -p "$STUDY/chunks" "$STUDY/whl" "$STUDY/data"
  gguf=$($PY -c "from spd.models import ALIASES; print(ALIASES['$MODEL'].gguf_path())")
  split -b "${CHUNK_MIB}M" -d -a 2 "$gguf" "$STUDY/chunks/"
  (cd "$STUDY/chunks" && sha256sum -- * >../chunks.sha256)
  data=${SPD_DATA_DIR:-../shared/data}
  for d in mbpp codealpaca gsm8k svamp mmlu bbh; do cp -r "$data/$d" "$STUDY/data/"; done
  cp "$data/README.md" "$STUDY/data/" 2>/dev/null || true
  $PY -m pip download -q --no-deps --only-binary=:all: -d "$STUDY/whl" \
      "gguf==$($PY -c 'import importlib.metadata as m; print(m.version("gguf"))')"
  n=$(wc -l <"$STUDY/chunks.sha256"); last=$(printf '%02d' $((n - 1)))
  final_mib=$(bash bench/device_tree.sh mib "$STUDY/chunks.sha256" "$STUDY/chunks/$last" "$STUDY/data" "$STUDY/whl")
  if (( final_mib > 62 )); then
    echo "the last call would carry ${final_mib} MiB, over the device tool's 64 MiB: move the CPU study's" \
         "archive out of the tree first (bash bench/device_tree.sh stash)" >&2
    exit 1
  fi
  echo "prepared $STUDY: $n chunks of ${CHUNK_MIB} MiB (tree ${tree_mib} MiB), data $(du -sh "$STUDY/data" | cut -f1)," \
       "$(ls "$STUDY/whl")"
  echo "calls, back to back (the machine goes back 30 s after a call):"
  for ((i = 0; i < n - 1; i++)); do
    printf '  run(command="bash bench/device_study.sh --receive", carry=[".device/study/chunks.sha256", ".device/study/chunks/%02d"])\n' "$i"
  done
  echo "  run(command=\"BUDGET_S=480 bash bench/device_study.sh\", timeout_s=570, carry=[\".device/study/chunks.sha256\"," \
       "\".device/study/chunks/$last\", \".device/study/data\", \".device/study/whl\"])"
  exit 0
fi

if [[ ${1:-} == --receive ]]; then
  receive
  exit
fi

: "${OUT:?set OUT to the folder for the results (the device tool sets it)}"
PY=${PY:-python3}
BUDGET_S=${BUDGET_S:-480}
BATCH=${BATCH:-256}
ONLY=${ONLY:-"$MODEL/code/ $MODEL/math/ $MODEL/qa/"}
ARCHIVE=bench/results/study-gpu
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1 SPD_CACHE_DIR=$STAGE/cache SPD_DATA_DIR=$PWD/$STUDY/data
export PYTHONPATH=$STAGE/site:$PWD/python:$PWD${PYTHONPATH:+:$PYTHONPATH}
mkdir -p "$OUT"
SUMMARY=$OUT/summary.md
t0=$SECONDS
say() { echo "$*" | tee -a "$SUMMARY"; }
: >"$SUMMARY"

say "# The study on $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 || echo 'no GPU') ($(date -u +%FT%TZ))"
receive | tee -a "$SUMMARY" || exit 1
sums=$PWD/$STUDY/chunks.sha256
if ! (cd "$STAGE/chunks" && sha256sum -c --quiet "$sums") >>"$SUMMARY" 2>&1; then
  say "chunks missing or damaged (the machine was given back between calls, or a call was skipped): send them again"
  exit 1
fi
target=$SPD_CACHE_DIR/gguf/$("$PY" -c "from spd.models import ALIASES; print(ALIASES['$MODEL'].filename)")
mkdir -p "${target%/*}"
[[ -f $target.verified ]] || cat "$STAGE"/chunks/* >"$target"   # spd checks its sha256 before use
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$STAGE/site" \
  "$STUDY"/whl/*.whl >>"$SUMMARY" 2>&1 || { say "could not install the carried wheels"; exit 1; }
"$PY" -c "import torch, transformers, peft, spd_ext; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'| transformers', transformers.__version__, '| peft', peft.__version__, '| extension', spd_ext.has_extension())" \
  2>&1 | tee -a "$SUMMARY"

[[ -f docs/RESULTS-gpu.md ]] && cp docs/RESULTS-gpu.md "$OUT/"   # its hand-written parts stay
only=(); for o in $ONLY; do only+=(--only "$o"); done
args=(bench/study.py --models "$MODEL" --root "$STAGE/runs" --archive "$ARCHIVE" --doc "$OUT/RESULTS-gpu.md"
      --batch-size "$BATCH" "${only[@]}")
[[ -n ${DRY:-} ]] && args+=(--dry-run)
left=$((BUDGET_S - (SECONDS - t0) - 45))   # 45 s for the runs to stop and the archive to be packed
say "study: ${left} s, $ONLY, batches of $BATCH"
timeout -s INT --kill-after=30 "$left" "$PY" "${args[@]}" >"$OUT/study.log" 2>&1
rc=$?
say "study exit $rc$( ((rc == 124)) && echo ' (the budget ran out; finished phases are kept)') after $((SECONDS - t0)) s"
grep -E '^\[study [0-9]+/' "$OUT/study.log" | tail -20 | tee -a "$SUMMARY"
if [[ -d $ARCHIVE ]]; then
  tar -cf - -C bench/results study-gpu | split -b 15M - "$OUT/archive.tar."
  say "archive: $(du -sh "$ARCHIVE" | cut -f1) in $(ls "$OUT"/archive.tar.* | wc -l) pieces"
fi
say "total: $((SECONDS - t0)) s"
