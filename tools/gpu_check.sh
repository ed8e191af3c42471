#!/usr/bin/env bash
# Does lmheads work on this GPU machine? One command that ends within 8 minutes (its deadline):
#
#     bash tools/gpu_check.sh [OUT_DIR]          # default OUT_DIR: gpu-check-<date>-<time>
#
# Runs, each under its own time limit, with its log in OUT_DIR/<check>.log:
#   - short fits of the quickstart on the GPU, all at once (they are small; the GPU is shared):
#     bf16-mixed with gradient clipping at 1.0 (fused AdamW), 16-mixed with clipping (loss scaling),
#     bf16-true, model.compile=true, FSDP2 and FSDP1 on one device, and every registered head once;
#   - the GPU tests (pytest -m gpu), beside the fits;
#   - then alone on the GPU, since they time it: tools/bench_head.py (bf16) at GPT-2 small's head
#     (N=16384 D=768 V=50304; the default chunk size, 256 and 4096) and Llama-3-8B's (N=8192 D=4096
#     V=128256; the default chunk size); tools/bench_train.py: GPT-2 small, tied and untied, the plain
#     compiled loop with F.cross_entropy, and the plain loop and Lightning each with the chunked loss
#     (the default chunk size; with --extended also 4096 and the full logits), two windows a path.
# Then prints a table: check, status, seconds, key figure. Exit status: the number of failed checks.
# Everything ends by LMHEADS_CHECK_SECONDS (default 480, 900 with --extended): a check that would run
# past it gets the time left, and one that cannot start in time is reported as SKIPPED, so the table
# always comes out.
# Wheels carried in .whl/ (a machine without a package index) are installed first when present.
#
#     bash tools/gpu_check.sh --extended [OUT_DIR]  # also the measurements behind docs/performance.md:
#                                                # more chunk sizes in both benchmarks, GPT-2's head with
#                                                # fp32 weights under bf16 autocast (as in training) and
#                                                # the chunk step's alternatives to its defaults; its
#                                                # deadline is 15 minutes
#     bash tools/gpu_check.sh --tiny [OUT_DIR]   # the same checks on the CPU at toy sizes (FSDP1 and
#                                                # 16-mixed left out): tries the script itself
#     bash tools/gpu_check.sh --only REGEX [OUT_DIR]  # only the checks whose names match (bash regex):
#                                                # 'fit|gpu-tests' or 'bench', to split it over two calls
set -u
tiny=0 only="" extended=0
while [ $# -gt 0 ]; do
  case $1 in
    --tiny) tiny=1; shift ;;
    --extended) extended=1; shift ;;
    --only) only=${2:?--only needs a pattern}; shift 2 ;;
    -*)
      echo "error: unknown option $1; usage: bash tools/gpu_check.sh [--tiny] [--extended] [--only REGEX]" \
        "[OUT_DIR]" >&2
      exit 2 ;;
    *) break ;;
  esac
done
# shellcheck source=tools/gpu_lib.sh
. "$(dirname "$0")/gpu_lib.sh"
new_out check "${1:-}"
cd "$(dirname "$0")/.."
deadline=${LMHEADS_CHECK_SECONDS:-$([ "$extended" = 1 ] && echo 900 || echo 480)}
gpu_setup

accelerator=gpu steps=60 head_steps=30 precision=bf16-mixed
# Chunk sizes besides the default (always timed). 256: the largest chunk whose logits fit GPT-2's 125 MiB
# target beside the gradients; 4096: the fastest measured.
gpt2_sizes=(256 4096) llama3_sizes=() train_sizes=(default)
[ "$extended" = 1 ] && gpt2_sizes=(256 1024 2048 4096) llama3_sizes=(512 2048) train_sizes=(default 4096)
head_gpt2=(--n 16384 --d 768 --v 50304 --dtype bfloat16 --chunk-sizes "${gpt2_sizes[@]}")
head_llama3=(--n 8192 --d 4096 --v 128256 --dtype bfloat16 --chunk-sizes "${llama3_sizes[@]}" --iters 5)
# Each path in two windows taken in turns; the full logits on both sides only with --extended (each
# window compiles once: ten compiled runs a head with both losses).
train=(--steps 20 --warmup 8 --chunk-sizes "${train_sizes[@]}" --repeats 2 --loss-backends chunked)
[ "$extended" = 1 ] && train=(--steps 20 --warmup 8 --chunk-sizes "${train_sizes[@]}" --repeats 2)
fit_seconds=120  # each fit's limit (the compiled one gets 60 s more)
if [ "$tiny" = 1 ]; then
  accelerator=cpu steps=4 head_steps=2
  # All the fits and the tests at once on a few cores: one thread each (torch's default of one a core
  # made six fits at once take 150 s instead of 91 s on 2 cores), and longer limits.
  export OMP_NUM_THREADS=1
  fit_seconds=300
  head_gpt2=(--n 256 --d 32 --v 1000 --dtype bfloat16 --chunk-sizes 64 --iters 1 --warmup 1 --no-compile)
  head_llama3=("${head_gpt2[@]}")
  train=(--preset tiny --steps 2 --warmup 1 --no-compile)
fi

# A short quickstart fit, into OUT_DIR/runs (later options override earlier ones).
fit=(python -m lmheads fit --config configs/quickstart.yaml --trainer.accelerator="$accelerator"
  --trainer.devices=1 --trainer.max_steps="$steps" --trainer.val_check_interval="$steps"
  --trainer.enable_progress_bar=false --trainer.logger.init_args.save_dir="$out/runs"
  --trainer.precision="$precision")
FIT_FIGURE='val/loss|error:'

# Fits, all at once, each into its own run folder (named after the check).
start_fit() {
  local name=$1 secs=$2
  shift 2
  start "$name" "$secs" "$FIT_FIGURE" "${fit[@]}" "$@" --trainer.logger.init_args.version="$name"
}
start_fit fit-bf16-clip "$fit_seconds" --trainer.gradient_clip_val=1.0
start_fit fit-bf16-true "$fit_seconds" --trainer.precision=bf16-true  # the model itself in bf16
start_fit fit-compile $((fit_seconds + 60)) --model.compile=true
start_fit fit-fsdp2 "$fit_seconds" --config configs/trainer/fsdp2.yaml --trainer.accelerator="$accelerator" \
  --trainer.devices=1 --trainer.strategy.init_args.data_parallel_size=1
if [ "$tiny" = 0 ]; then  # CUDA only: Lightning refuses FSDP1 on a CPU and turns 16-mixed into bf16 there
  start_fit fit-16-mixed-clip "$fit_seconds" --trainer.precision=16-mixed --trainer.gradient_clip_val=1.0
  start_fit fit-fsdp1 "$fit_seconds" --config configs/trainer/fsdp.yaml --trainer.devices=1
fi
for head in $(python -c "from lmheads.heads import registered_heads; print(*registered_heads())"); do
  start_fit "fit-$head" "$fit_seconds" --model.head="$head" --trainer.max_steps="$head_steps" \
    --trainer.val_check_interval="$head_steps"
done
start gpu-tests 240 'passed|failed|skipped' python -m pytest -q -m gpu -p no:cacheprovider \
  --durations=10  # beside the fits; the log lists the ten slowest
finish
find "$out/runs" -name '*.ckpt' -delete 2> /dev/null  # the logs stay; the checkpoints were for the fits
# Benchmarks last, one at a time, with the GPU to themselves.
check bench-head-gpt2 150 '^\| (chunked|naive\+compile)' python tools/bench_head.py "${head_gpt2[@]}"
if [ "$extended" = 1 ]; then
  check bench-head-gpt2-mixed 180 '^\| (chunked|naive\+compile)' \
    python tools/bench_head.py "${head_gpt2[@]}" --mixed --variants
fi
check bench-head-llama3 150 '^\| (chunked|naive\+compile)' python tools/bench_head.py "${head_llama3[@]}"
# Last: it compiles once a window (two heads x three paths x two windows; more with --extended) and takes
# the time left.
check bench-train-gpt2 570 'framework:' python tools/bench_train.py "${train[@]}"
summary check
