#!/usr/bin/env bash
# The converged answer on one GPU, in one command that ends within 9.5 minutes (its deadline):
#
#     bash tools/gpu_study.sh [OUT_DIR]          # default OUT_DIR: gpu-study-<date>-<time>
#
#   1. tokenizes WikiText-2 (word level) and Tiny Shakespeare (characters) once, for every run;
#   2. trains, all at once on the one GPU: configs/experiments/wikitext2_converged.yaml's whole schedule
#      with the heads LMHEADS_STUDY_HEADS (default "tied untied") and seeds LMHEADS_STUDY_SEEDS (default
#      "0 1 2 3") (tools/sweep.py); with LMHEADS_STUDY_NANOGPT=1 also nanoGPT's Shakespeare run
#      (configs/experiments/shakespeare_char.yaml) on nanoGPT's own split of the text (the first 90% of
#      the characters for training, the rest for validation);
#   3. tests each WikiText-2 run's best checkpoint (lowest validation loss) on the test split;
#   4. writes the report to OUT_DIR: tools/compare.py tables and plots (--best), tools/buckets.py
#      (tied - untied per frequency bucket, and untied - tied at each validation), tools/embeddings.py
#      (the token matrices' geometry), and the runs' logs without their checkpoints (OUT_DIR/runs), then
#      prints a summary.
#
# Everything ends by LMHEADS_STUDY_SECONDS (default 570) after the start: training stops 110 s before
# that, whatever remains (each run then saves interrupted.ckpt), the report covers what finished, and
# calling the script again with the same runs folder resumes the rest. Checkpoints stay in
# LMHEADS_STUDY_RUNS (default /tmp/lmheads-study), out of OUT_DIR. The corpora are read from
# LMHEADS_DATA (default: .data if it exists, else data, where the configs read them):
# wikitext-2/{train,valid,test}.txt and tinyshakespeare/input.txt.
# Wheels carried in .whl/ (a machine without a package index) are installed first when present.
#
#     bash tools/gpu_study.sh --tiny [OUT_DIR]   # the same steps on the CPU at toy sizes: tries the script
set -u
tiny=0
if [ "${1:-}" = "--tiny" ]; then tiny=1; shift; fi
if [[ ${1:-} == -* ]]; then
  echo "error: unknown option $1; usage: bash tools/gpu_study.sh [--tiny] [OUT_DIR]" >&2
  exit 2
fi
# shellcheck source=tools/gpu_lib.sh
. "$(dirname "$0")/gpu_lib.sh"
new_out study "${1:-}"
runs=$(realpath -m "${LMHEADS_STUDY_RUNS:-/tmp/lmheads-study}")
data=${LMHEADS_DATA:+$(realpath -m "$LMHEADS_DATA")}
cd "$(dirname "$0")/.."
[ -n "$data" ] || { [ -d .data ] && data=.data; } || data=data
deadline=${LMHEADS_STUDY_SECONDS:-570}
reserve=110  # seconds kept after training for the tests and the report (103 s on an H200 one step at a
# time; with the report's steps side by side, its longest, the geometry, sets the time: about 65 s)
for file in wikitext-2/train.txt wikitext-2/valid.txt wikitext-2/test.txt tinyshakespeare/input.txt; do
  if [ ! -f "$data/$file" ]; then
    echo "error: $data/$file not found; set LMHEADS_DATA to the corpora's folder" >&2
    exit 1
  fi
done
gpu_setup
if [ -n "$(ls -A "$runs" 2> /dev/null)" ]; then
  echo "note: $runs holds earlier runs: finished ones are kept, interrupted ones resume"
fi
mkdir -p "$runs"

wikitext_config=(--config configs/experiments/wikitext2_converged.yaml)
wikitext_data=(--data.init_args.train_file="$data/wikitext-2/train.txt"
  --data.init_args.validation_file="$data/wikitext-2/valid.txt"
  --data.init_args.test_file="$data/wikitext-2/test.txt")
wikitext=("${wikitext_config[@]}" "${wikitext_data[@]}")
shakespeare_config=(--config configs/experiments/shakespeare_char.yaml)
# nanoGPT's split (data/shakespeare_char/prepare.py): the first 90% of the characters train, the rest
# validate. Written once: a resumed run reads the same files.
split="$runs/data/tinyshakespeare"
if [ ! -f "$split/val.txt" ]; then
  mkdir -p "$split"
  python -c 'import sys, pathlib
text = pathlib.Path(sys.argv[1]).read_text(encoding="utf-8")
n = int(len(text) * 0.9)
for name, part in (("train.txt", text[:n]), ("val.txt", text[n:])):
    pathlib.Path(sys.argv[2], name).write_text(part, encoding="utf-8", newline="")
print(f"nanoGPT split: {n:,} training and {len(text) - n:,} validation characters")' \
    "$data/tinyshakespeare/input.txt" "$split" || exit 1
fi
# The config holds out 10% of input.txt's lines; with a validation file nothing is held out, and the
# share is refused unless at its default.
shakespeare_data=(--data.init_args.train_file="$split/train.txt"
  --data.init_args.validation_file="$split/val.txt" --data.init_args.val_fraction=0.05)
shakespeare=("${shakespeare_config[@]}" "${shakespeare_data[@]}")
# Without a text sample at each of its 20 validations (200 tokens one at a time: about 2 s each on a
# shared GPU), as nanoGPT trains. Samples draw from their own generator: training is the same either way.
shakespeare_run=("${shakespeare_data[@]}" --sampling.validation_samples=0)
read -r -a heads <<< "${LMHEADS_STUDY_HEADS:-tied untied}"
read -r -a seeds <<< "${LMHEADS_STUDY_SEEDS:-0 1 2 3}"
nanogpt=${LMHEADS_STUDY_NANOGPT:-0}
small=() placement=(--jobs 8 --gpus 0,0,0,0,0,0,0,0) nano_placement=(--gpus 0) parallel=8
if [ "$tiny" = 1 ]; then
  small=(--trainer.accelerator=cpu --trainer.max_steps=6 --trainer.val_check_interval=3
    --trainer.log_every_n_steps=1 --model.backbone.n_layer=1 --model.backbone.n_head=2
    --model.backbone.d_model=32 --model.backbone.block_size=32 --data.init_args.batch_size=4
    --sampling.validation_samples=0 --trainer.limit_val_batches=4 --trainer.limit_test_batches=4)
  placement=(--jobs 2) nano_placement=() parallel=2
  deadline=${LMHEADS_STUDY_SECONDS:-900} reserve=300
fi

# 1. Tokenize once (each run would otherwise tokenize the corpus itself, all at the same time).
prepare='import sys
from lmheads.cli import main
data = main(sys.argv[1:], run=False).datamodule
data.prepare_data()
data.setup("fit")
tokens = int(data.train_token_counts().sum())
print(f"{type(data).__name__}: vocabulary {data.vocab_size:,}, training tokens {tokens:,}")'
start prepare-wikitext2 180 'vocabulary' python -c "$prepare" "${wikitext[@]}" "${small[@]}"
[ "$nanogpt" = 1 ] && start prepare-shakespeare 60 'vocabulary' python -c "$prepare" "${shakespeare[@]}" "${small[@]}"
finish

# 2. Train: both sweeps side by side (a sweep skips finished runs and resumes interrupted ones). At the
# deadline each sweep gets SIGTERM and passes it on to its runs, which save interrupted.ckpt and stop.
train_seconds=$((deadline - reserve - SECONDS))
echo "=== train (at most ${train_seconds}s)"
t0=$SECONDS
python tools/sweep.py "${wikitext_config[@]}" --name wikitext2_converged --root "$runs" \
  --heads "${heads[@]}" --seeds "${seeds[@]}" "${placement[@]}" -- "${wikitext_data[@]}" "${small[@]}" \
  > "$out/sweep.log" 2>&1 &
sweep=$!
if [ "$nanogpt" = 1 ]; then
  python tools/sweep.py "${shakespeare_config[@]}" --name shakespeare_char --root "$runs" --heads tied \
    --seeds 1337 ${nano_placement[@]+"${nano_placement[@]}"} -- "${shakespeare_run[@]}" "${small[@]}" \
    > "$out/shakespeare.log" 2>&1 &
  nano=$!
else
  true &  # no nanoGPT run: a finished job in its place
  nano=$!
fi
trap 'kill -TERM "$sweep" "$nano" 2> /dev/null' INT TERM  # stopping this script stops them the same way
stopped=""
while kill -0 "$sweep" 2> /dev/null || kill -0 "$nano" 2> /dev/null; do
  if [ $((SECONDS - t0)) -ge "$train_seconds" ] && [ -z "$stopped" ]; then
    stopped=" (stopped at ${train_seconds}s)"
    echo "deadline: stopping the runs (each saves interrupted.ckpt)"
    kill -TERM "$sweep" "$nano" 2> /dev/null
  fi
  sleep 2
done
wait "$sweep"
sweep_rc=$?
wait "$nano"
nano_rc=$?
trap - INT TERM
dt=$((SECONDS - t0))
status() {  # a sweep stopped at the deadline exits 143 (SIGTERM): a timeout, as gpu_lib.sh says it
  if [ "$1" = 0 ]; then echo ok
  elif [ "$1" = 143 ] && [ -n "$stopped" ]; then echo TIMEOUT
  else echo "FAIL($1)"; fi
}
record train-wikitext2 "$(status "$sweep_rc")" "$dt" \
  "$(grep -cE ': (done|skipped)' "$out/sweep.log") of $((${#heads[@]} * ${#seeds[@]})) runs done$stopped"
if [ "$nanogpt" = 1 ]; then
  nano_log=$(ls "$runs"/shakespeare_char/*/sweep.log 2> /dev/null | head -n 1)
  record train-shakespeare "$(status "$nano_rc")" "$dt" \
    "$(grep -hE '^  val/loss|error:|SIG' "$out/shakespeare.log" ${nano_log:+"$nano_log"} | tail -n 1)"
fi

# 3. Test each WikiText-2 run's best checkpoint (the one ModelCheckpoint kept for its validation loss),
# several at once.
test_seconds=$(limit 150)
echo "=== test (at most ${test_seconds}s)"
t0=$SECONDS
tested=0 untested=() pids=() names=()
shopt -s nullglob
for run in "$runs"/wikitext2_converged/*/; do
  run=${run%/}
  best=$(ls "$run"/checkpoints/step*.ckpt 2> /dev/null | head -n 1)
  if [ -z "$best" ]; then
    untested+=("$(basename "$run")")
    continue
  fi
  [ "$test_seconds" -gt 0 ] || { untested+=("$(basename "$run") (no time left)"); continue; }
  timeout -k 10 "$test_seconds" python -m lmheads test "${wikitext[@]}" "${small[@]}" --ckpt_path="$best" \
    --trainer.enable_progress_bar=false > "$out/test-$(basename "$run").log" 2>&1 &
  pids+=($!) names+=("$(basename "$run")")
  while [ "$(jobs -rp | wc -l)" -ge "$parallel" ]; do sleep 1; done
done
for i in "${!pids[@]}"; do
  if wait "${pids[$i]}"; then tested=$((tested + 1)); else untested+=("${names[$i]}"); fi
done
record test-wikitext2 "$([ ${#untested[@]} = 0 ] && echo ok || echo FAIL)" $((SECONDS - t0)) \
  "$tested best checkpoints tested${untested:+; not: ${untested[*]}}"

# 4. The report: its steps side by side (each only reads the runs and writes its own files).
report="$out/wikitext2_converged"
start compare-wikitext2 120 '^\| tied ' python tools/compare.py "$runs/wikitext2_converged" --best \
  --out "$report" --plot diag/grad_share_output
if [ "$nanogpt" = 1 ]; then
  start compare-shakespeare 60 '^\| tied ' python tools/compare.py "$runs/shakespeare_char" --best \
    --out "$out/shakespeare_char"
fi
start buckets-wikitext2 60 '^\| ' python tools/buckets.py "$runs/wikitext2_converged" --heads tied untied \
  --out "$report"
start steps-wikitext2 60 '^\| [0-9]' python tools/buckets.py "$runs/wikitext2_converged" --heads untied tied \
  --over-steps --out "$report"
geometry=()
for head in "${heads[@]}"; do geometry+=("$runs/wikitext2_converged/$head-seed${seeds[0]}"); done
start geometry-wikitext2 120 '^\| ' python tools/embeddings.py "${geometry[@]}" --out "$report/geometry"
finish
mkdir -p "$out/runs"
tar -C "$runs" --exclude='*.ckpt' -cf - . | tar -C "$out/runs" -xf -

echo
for table in "$report/table.md" "$report/differences_over_steps.md" "$report/bucket_differences.md" \
  "$out/shakespeare_char/table.md"; do
  [ -f "$table" ] && { echo "=== $table"; cat "$table"; echo; }
done
summary step
