#!/usr/bin/env bash
# Merge a consolidated LoRA adapter into the base weights (W + scaling * B @ A): a plain Transformers model to
# deploy without PEFT.
#
#   bash examples/merge.sh                  (outputs under ./examples_output; WORK=... to change)
source "$(dirname "$0")/_common.sh"
ensure_adapter count_up

# BASE_DIR ADAPTER_DIR: a Transformers directory (safetensors) and a vanilla PEFT adapter. The output has the base's
# files, shard names and index; only the targeted matrices are read into memory, one at a time.
# -o / --output-dir, --overwrite, --device cpu|cuda[:N]|xla (default cpu), --no-progress as for combine.
optimum-neuron-peft merge into-base "$WORK/base" "$WORK/runs/count_up/consolidated" \
    -o "$WORK/merged/count_up" --overwrite --no-progress

# The merged model alone gives the logits of base + adapter under PEFT.
python - "$WORK/base" "$WORK/runs/count_up/consolidated" "$WORK/merged/count_up" <<'PY'
import sys

import peft
import torch
import transformers

base, adapter, merged = sys.argv[1:]
tokens = torch.arange(2, 18).unsqueeze(0)  # "count up" from token 2
with torch.no_grad():
    expected = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base), adapter)(tokens).logits
    got = transformers.AutoModelForCausalLM.from_pretrained(merged)(tokens).logits
diff = float((got - expected).abs().max())
if diff > 1e-4:
    raise SystemExit(f"error: merged logits differ from base + adapter by {diff:.2e}")
print(f"merged model == base + adapter (max logits difference {diff:.1e})")
PY
