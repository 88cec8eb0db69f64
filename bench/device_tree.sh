#!/usr/bin/env bash
# What a call of the `device` tool carries, and the CPU study's archive out of its way.
# Every call moves the working tree (tracked and untracked, not ignored) plus its `carry` paths,
# 64 MiB at most; the study's archive (bench/results/study/, tracked, ~4.5 MB per trained run)
# alone passes that after about a dozen runs. So, for the calls of bench/device_check.sh and
# bench/device_study.sh:
#
#   bash bench/device_tree.sh mib [PATH...]   # MiB a call carrying PATH... moves
#   bash bench/device_tree.sh stash           # the archive into .git/ (which does not travel)
#   ... the device calls ...
#   bash bench/device_tree.sh unstash         # and back, checked against git
#
# `stash` refuses while bench/study.py is running (it writes the archive when a run ends): stop it
# with `kill -STOP` (its `spd run` may go on) or Ctrl-C first, and stop anything that commits
# bench/results/ (a commit meanwhile would record the archive as deleted) until `unstash`.
set -uo pipefail
cd "$(dirname "$0")/.."

ARCHIVE=${ARCHIVE:-bench/results/study}
STASH=${STASH:-$(git rev-parse --git-dir)/spd-device-stash}

tree_bytes() {  # the working tree as the device tool sees it, plus the paths given
  local tree extra=0
  tree=$(git ls-files -z -co --exclude-standard | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1)
  (( $# )) && extra=$(du -cb "$@" | tail -1 | cut -f1)
  echo $(( ${tree:-0} + extra ))
}

mib() { echo $(( ($1 + 1048575) / 1048576 )); }  # bytes to MiB, rounded up

study_running() {  # pids of this checkout's bench/study.py processes that are not stopped
  local pid arg script
  for pid in $(pgrep -f 'bench/study\.py' || true); do
    script=
    while IFS= read -r -d '' arg; do  # the script's path, as the process named it, from its cwd
      [[ $arg == *bench/study.py ]] && { script=$arg; break; }
    done <"/proc/$pid/cmdline" 2>/dev/null
    [[ -n $script ]] || continue
    [[ $script == /* ]] || script=$(readlink "/proc/$pid/cwd" 2>/dev/null)/$script
    [[ $(readlink -f "$script") == "$(pwd -P)/bench/study.py" ]] || continue
    [[ $(ps -o stat= -p "$pid" 2>/dev/null) == T* ]] || echo "$pid"
  done
}

case ${1:-} in
  mib)
    shift
    for p in "$@"; do [[ -e $p ]] || { echo "device_tree: no such path to carry: $p" >&2; exit 2; }; done
    mib "$(tree_bytes "$@")"
    ;;
  stash)
    [[ -e $STASH ]] && { echo "device_tree: $STASH already holds a stashed archive: unstash it first" >&2; exit 1; }
    [[ -d $ARCHIVE ]] || { echo "device_tree: no $ARCHIVE to stash" >&2; exit 1; }
    running=$(study_running)
    if [[ -n $running ]]; then
      echo "device_tree: bench/study.py is running (pid $(echo $running)), and writes $ARCHIVE when a run ends:" \
           "kill -STOP it first (or stop it with Ctrl-C)" >&2
      exit 1
    fi
    if [[ -n $(git status --porcelain -- "$ARCHIVE") ]]; then
      echo "device_tree: $ARCHIVE has changes git has not committed: commit them first" >&2
      exit 1
    fi
    mkdir -p "$STASH" && mv "$ARCHIVE" "$STASH/archive" && echo "$ARCHIVE" >"$STASH/path"
    echo "stashed $ARCHIVE in $STASH; the tree is now $(mib "$(tree_bytes)") MiB." \
         "Commit nothing under bench/results/ until: bash bench/device_tree.sh unstash"
    ;;
  unstash)
    [[ -d $STASH/archive ]] || { echo "device_tree: nothing stashed in $STASH" >&2; exit 1; }
    path=$(cat "$STASH/path")
    if [[ -e $path ]]; then
      echo "device_tree: $path exists again (something wrote it meanwhile): move it away, then unstash" >&2
      exit 1
    fi
    mv "$STASH/archive" "$path" && rm -rf "$STASH"
    if [[ -n $(git status --porcelain -- "$path") ]]; then
      echo "device_tree: $path is back but differs from git's (a commit meanwhile?):" >&2
      git status --short -- "$path" | head -5 >&2
      exit 1
    fi
    echo "unstashed $path (as git has it); kill -CONT the study"
    ;;
  *)
    echo "usage: bash bench/device_tree.sh mib [PATH...] | stash | unstash" >&2
    exit 2
    ;;
esac
