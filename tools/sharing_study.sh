#!/usr/bin/env bash
# Where a parameter is best saved: every way of saving parameters from one reference model, each at
# three budgets and three seeds under one training budget, run by tools/sweep.py (resumable: the same
# command again skips finished runs), then reported by tools/frontier.py.
#
#   bash tools/sharing_study.sh CONFIG [ROOT] [-- options for every run]
#
# CONFIG is a study config of configs/experiments/ (the reference model: untied head, n_layer blocks of
# width d_model). The grids below are the ones its header names. SEEDS (default "0 1 2"), JOBS (runs at
# once, default 1) and REPORT (default docs/results/<config name>) can be set in the environment.
set -euo pipefail
if [[ $# -lt 1 || $1 == -* ]]; then
  echo "error: give a study config; usage: bash tools/sharing_study.sh CONFIG [ROOT] [-- options for every run]" >&2
  exit 2
fi
config=$1
root=${2:-runs}
shift $(($# > 1 ? 2 : 1))
[[ ${1:-} == "--" ]] && shift
name=$(basename "$config" .yaml)
case "$name" in
  sharing_synthetic) widths=112,96,80 embeds=64,32,16 ;;
  sharing_synthetic_embedding) widths=60,56,48 embeds=32,16,8 ;;
  sharing_synthetic_scarce) widths=60,52,44 embeds=32,16,8 ;;
  sharing_wikitext2) widths=60,56,48 embeds=32,16,8 ;;
  sharing_wikitext2_large) widths=124,120,96 embeds=64,32,16 ;;
  sharing_shakespeare_words) widths=60,56,48 embeds=32,16,8 ;;
  sharing_shakespeare_words_large) widths=120,116,108 embeds=64,32,16 ;;
  *) echo "error: no grids for $name; add its widths and embedding widths to tools/sharing_study.sh" >&2; exit 2 ;;
esac
seeds=(${SEEDS:-0 1 2})
sweep() {
  python tools/sweep.py --config "$config" --root "$root" --name "$name" --seeds "${seeds[@]}" \
    --jobs "${JOBS:-1}" "$@"
}
sweep --heads untied tied -- "$@"                                            # the reference; the tie
sweep --heads untied --grid model.backbone.layer_sharing=all -- "$@"         # one block for every layer
sweep --heads untied --grid model.backbone.layer_sharing=cycle model.backbone.unique_layers=2,3 -- "$@"
sweep --heads untied --grid model.backbone.n_layer=1,2,3 -- "$@"             # fewer layers
sweep --heads untied --grid "model.backbone.d_model=$widths" -- "$@"         # narrower
sweep --heads untied --grid "model.backbone.d_embed=$embeds" -- "$@"         # a factorised embedding
python tools/frontier.py "$root/$name" --reference untied --out "${REPORT:-docs/results/$name}"
