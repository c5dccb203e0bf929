#!/usr/bin/env bash
# The whole job on a tiny model, from nothing: build a model, train two LoRA adapters with tensor parallelism,
# consolidate, verify, reshard, combine, merge. Each step is one of the examples beside this file.
#
#   bash examples/end_to_end.sh             (outputs under ./examples_output; WORK=... to change)
set -euo pipefail
here="$(dirname "$0")"
for example in consolidate verify reshard combine merge; do
    echo "=================== examples/$example.sh"
    bash "$here/$example.sh"
done
echo "all examples passed; outputs in ${WORK:-examples_output}"
