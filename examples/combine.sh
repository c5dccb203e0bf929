#!/usr/bin/env bash
# Combine two consolidated LoRA adapters into one (the combination types of PEFT's add_weighted_adapter).
#
#   bash examples/combine.sh                (outputs under ./examples_output; WORK=... to change)
source "$(dirname "$0")/_common.sh"
ensure_adapter count_up
ensure_adapter count_down
UP="$WORK/runs/count_up/consolidated"       # vanilla PEFT adapters, written by train_lora.py --consolidate
DOWN="$WORK/runs/count_down/consolidated"

# ADAPTER_DIR...           the adapters, in the order of --weights
# --weights                one weight per adapter (may be negative)
# --combination-type ties  trim each delta to its largest --density fraction, elect a sign per entry, average
# -o / --output-dir        written atomically; --overwrite replaces it; --device cpu|cuda[:N]|xla (default cpu)
optimum-neuron-peft merge combine "$UP" "$DOWN" --weights 1.0 1.0 --combination-type ties --density 0.5 \
    -o "$WORK/combined/ties" --overwrite --no-progress

# cat: the ranks side by side (r = 8 + 8), exactly the weighted sum of the two adapters' deltas.
optimum-neuron-peft merge combine "$UP" "$DOWN" --weights 1.0 1.0 --combination-type cat \
    -o "$WORK/combined/cat" --overwrite --no-progress

# Other types: linear, dare_linear, dare_ties (random pruning; --seed makes the masks reproducible),
# magnitude_prune, svd (the exact weighted sum factored again, truncated to --svd-rank), ties_svd, ...
# See docs/merging.md for what each computes and how it compares with PEFT.
