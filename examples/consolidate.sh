#!/usr/bin/env bash
# Consolidate a sharded LoRA checkpoint (one file per tensor-parallel rank) into a vanilla PEFT adapter directory,
# then load it with plain Transformers + PEFT.
#
#   bash examples/consolidate.sh            (outputs under ./examples_output; WORK=... to change)
source "$(dirname "$0")/_common.sh"
ensure_adapter count_up
CKPT="$(last_checkpoint count_up)"   # <run>/checkpoint-N/adapter: manifest.json + adapter_default/adapter_shards/

# CHECKPOINT_DIR OUTPUT_DIR: the sharded input and where the vanilla adapter goes
#   (adapter_config.json + adapter_model.safetensors, original module names q_proj, k_proj, ...).
# --overwrite    replace OUTPUT_DIR if it is not empty (the output is always written atomically)
# --verify       re-derive every rank's shards from the output and compare bit for bit before publishing it
# --no-progress  no progress bar (the last line is a summary either way)
optimum-neuron-peft consolidate "$CKPT" "$WORK/consolidated/count_up" --overwrite --verify --no-progress

# The same adapter cast to bfloat16, written as PyTorch .bin instead of safetensors:
#   --adapter default  only that adapter, at OUTPUT_DIR itself (a checkpoint may hold several adapters)
#   --dtype bf16       cast floating tensors (bf16, fp16 or fp32; default: as saved)
#   --format pytorch   adapter_model.bin instead of adapter_model.safetensors
optimum-neuron-peft consolidate "$CKPT" "$WORK/consolidated/count_up_bf16" \
    --adapter default --dtype bf16 --format pytorch --overwrite --no-progress

# Vanilla Transformers + PEFT load the consolidated adapter; no tensor is missing or left unused.
python - "$WORK/base" "$WORK/consolidated/count_up" <<'PY'
import sys

import peft
import transformers

base, adapter = sys.argv[1], sys.argv[2]
from safetensors.torch import load_file

model = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base), adapter)
saved = load_file(f"{adapter}/adapter_model.safetensors")
loaded = peft.get_peft_model_state_dict(model)
if set(saved) != set(loaded) or any(not saved[k].equal(loaded[k]) for k in saved):
    raise SystemExit(f"error: {adapter} did not load exactly: {sorted(set(saved) ^ set(loaded))[:5]}")
print(f"loaded {adapter} with vanilla PEFT: {len(saved)} LoRA tensors, all equal to the file")
PY
