#!/usr/bin/env bash
# Check a consolidated adapter against the sharded checkpoint it came from, and see a corrupted copy get caught.
#
#   bash examples/verify.sh                 (outputs under ./examples_output; WORK=... to change)
source "$(dirname "$0")/_common.sh"
ensure_adapter count_up
CKPT="$(last_checkpoint count_up)"
OUT="$WORK/verify/count_up"

optimum-neuron-peft consolidate "$CKPT" "$OUT" --overwrite --no-progress

# CHECKPOINT_DIR CONSOLIDATED_DIR: re-derives every rank's shards from the consolidated tensors and compares them
# bit for bit with the rank files. It also checks the sha256 of every input file listed in the manifest
# (--skip-checksums to skip that); pass the same --adapter / --dtype as to consolidate.
optimum-neuron-peft verify "$CKPT" "$OUT"

# A consolidated copy with one changed number must fail, naming the rank file and the tensor.
rm -rf "$OUT-corrupted" && cp -r "$OUT" "$OUT-corrupted"
python - "$OUT-corrupted/adapter_model.safetensors" <<'PY'
import sys

from safetensors.torch import load_file, save_file

path = sys.argv[1]
tensors = load_file(path)
name = sorted(tensors)[0]
tensors[name].view(-1)[0] += 1.0
save_file(tensors, path)
PY
if optimum-neuron-peft verify "$CKPT" "$OUT-corrupted"; then
    echo "error: verify accepted a corrupted copy" >&2
    exit 1
fi
echo "verify rejected the corrupted copy, as it should"
