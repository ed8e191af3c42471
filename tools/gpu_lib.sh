# shellcheck shell=bash
# Sourced by tools/gpu_check.sh and tools/gpu_study.sh: the output folder, the machine's set-up, steps
# under time limits and one deadline, and the summary table. The caller sets `out` (its output folder,
# with new_out), `tiny` (1: on the CPU at toy sizes), `deadline` (seconds after its start by which every
# step must have ended) and may set `only` (a bash regex: steps whose names do not match it are left out,
# without a row).

rows=()
failed=0
started=()

# new_out KIND [OUT_DIR]: sets `out` to OUT_DIR (default gpu-KIND-<date>-<time>) as an absolute path, read
# from the folder the script is called in, and refuses one that holds files: an earlier KIND's, whose
# runs this one's would be refused beside, and whose report it would mix with its own.
new_out() {
  out=$(realpath -m "${2:-gpu-$1-$(date +%Y%m%d-%H%M%S)}")
  if [ -n "$(ls -A "$out" 2> /dev/null)" ]; then
    echo "error: $out is not empty (an earlier $1's?); give a new folder, or none for gpu-$1-<time>" >&2
    exit 2
  fi
}

# gpu_setup: installs the wheels carried in .whl/ (a machine without a package index), refuses a
# machine without CUDA unless tiny, then creates OUT and writes the date, card and versions to
# OUT/machine.txt (a refused start leaves no folder behind).
gpu_setup() {
  if [ -f .whl/setup.sh ]; then
    # shellcheck disable=SC1091
    . .whl/setup.sh || { echo "error: installing the wheels in .whl/ failed" >&2; exit 1; }
  fi
  export PYTHONUNBUFFERED=1 MPLBACKEND=Agg HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1
  if [ "$tiny" = 0 ] && ! python -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    echo "error: no CUDA device is visible to torch; on a machine without a GPU, try the script with --tiny" >&2
    exit 1
  fi
  mkdir -p "$out"
  {
    date -u +"%Y-%m-%d %H:%M UTC"
    if [ "$tiny" = 0 ]; then
      nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | head -n 1
    else
      echo "no GPU (--tiny on the CPU)"
    fi
    python -c "import torch, lightning; print('torch', torch.__version__, '| lightning', lightning.__version__,
      '| cuda', torch.version.cuda, '| available', torch.cuda.is_available())"
  } | tee "$out/machine.txt"
}

# record NAME STATUS SECONDS KEY: one row of the summary (a status other than ok counts as a failure).
record() {
  [ "$2" = ok ] || failed=$((failed + 1))
  rows+=("$(printf '| %-22s | %-9s | %5s | %s |' "$1" "$2" "$3" "$(echo "$4" | cut -c1-100)")")
}

# row NAME RC SECONDS FIGURE: the row of a step whose log is OUT/NAME.log. FIGURE is an extended regex;
# the last log line matching it is the key figure (else the last line). RC `skipped`: no time was left.
row() {
  local name=$1 rc=$2 dt=$3 figure=$4 status=ok key
  if [ "$rc" = skipped ]; then
    record "$name" SKIPPED 0 "no time left before the deadline (${deadline}s)"
    return
  fi
  if [ "$rc" -ne 0 ]; then
    status="FAIL($rc)"
    { [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; } && status="TIMEOUT"  # 137: killed after the TERM
    tail -n 20 "$out/$name.log"
  fi
  key=$(grep -E "$figure" "$out/$name.log" | tail -n 1)
  [ -n "$key" ] || key=$(grep -v '^\s*$' "$out/$name.log" | tail -n 1)
  record "$name" "$status" "$dt" "$key"
}

# limit SECONDS: the time a step may take, capped by what is left before the deadline (0: none left).
limit() {
  local left=$((deadline - SECONDS - 5))
  if [ "$left" -lt 15 ]; then echo 0; elif [ "$1" -lt "$left" ]; then echo "$1"; else echo "$left"; fi
}

# selected NAME: whether the step NAME is to run (see `only`).
selected() {
  [ -z "${only:-}" ] || [[ $1 =~ $only ]]
}

# start NAME SECONDS FIGURE COMMAND...: runs COMMAND in the background, under its time limit, its output
# in OUT/NAME.log; `finish` waits for every started step and adds their rows in the order they started.
start() {
  local name=$1 secs figure=$3
  selected "$name" || return 0
  secs=$(limit "$2")
  shift 3
  if [ "$secs" = 0 ]; then row "$name" skipped 0 "$figure"; return; fi
  echo "=== $name (at most ${secs}s)"
  {
    timeout -k 10 "$secs" "$@" > "$out/$name.log" 2>&1
    echo "$? $SECONDS" > "$out/.$name.end"  # its exit status, and when it ended (a subshell's SECONDS)
  } &
  started+=("$!|$name|$SECONDS|$figure")
}
finish() {
  local entry pid name t0 figure rc end
  for entry in "${started[@]}"; do
    IFS='|' read -r pid name t0 figure <<< "$entry"
    wait "$pid"
    read -r rc end < "$out/.$name.end"
    rm -f "$out/.$name.end"
    row "$name" "$rc" $((end - t0)) "$figure"
  done
  started=()
}

# check NAME SECONDS FIGURE COMMAND...: the same, waited for (with any other step still running).
check() {
  start "$@"
  finish
}

# summary WHAT: the table, after the card; the exit status is the number of failed steps.
summary() {
  echo
  echo "=== summary ($(head -n 2 "$out/machine.txt" | tail -n 1); logs in $out)"
  printf '| %-22s | %-9s | %5s | %s |\n' "$1" status s "key figure"
  echo "|---|---|---|---|"
  printf '%s\n' "${rows[@]}"
  exit "$failed"
}
