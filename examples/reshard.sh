#!/usr/bin/env bash
# Change the tensor-parallel size of checkpoints without consolidating to disk first: a sharded adapter checkpoint
# saved at tp 2 and a plain Transformers directory, both resharded to tp 4.
#
#   bash examples/reshard.sh                (outputs under ./examples_output; WORK=... to change)
source "$(dirname "$0")/_common.sh"
ensure_adapter count_up
CKPT="$(last_checkpoint count_up)"

# CHECKPOINT_DIR OUTPUT_DIR --tp-size N: the input may be our sharded format, optimum-neuron's, or a Transformers
# Llama directory; the output is always our sharded format (manifest.json + one safetensors file per rank).
# Key/value heads are replicated as tp 4 needs (the tiny model has 1 kv head). --overwrite / --no-progress as for
# consolidate.
optimum-neuron-peft reshard "$CKPT" "$WORK/reshard/count_up_tp4" --tp-size 4 --overwrite --no-progress
optimum-neuron-peft reshard "$WORK/base" "$WORK/reshard/base_tp4" --tp-size 4 --overwrite --no-progress

# Resharding only moves data: consolidating the tp-4 adapter gives byte-for-byte the file the tp-2 one gives.
optimum-neuron-peft consolidate "$CKPT" "$WORK/reshard/count_up_from_tp2" --overwrite --no-progress
optimum-neuron-peft consolidate "$WORK/reshard/count_up_tp4" "$WORK/reshard/count_up_from_tp4" --overwrite --no-progress
cmp "$WORK/reshard/count_up_from_tp2/adapter_model.safetensors" "$WORK/reshard/count_up_from_tp4/adapter_model.safetensors"
echo "tp 2 and tp 4 consolidate to identical adapters"
