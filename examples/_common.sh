# Shared setup of the shell examples; each example sources this file. Not meant to be run on its own.
#
# Everything goes under $WORK (default: ./examples_output), and what an example needs is created only when it is
# missing, so the examples can run in any order and reuse each other's outputs:
#   $WORK/base                      a tiny random Llama saved as a Transformers directory (no download)
#   $WORK/runs/<task>/checkpoint-N  sharded LoRA checkpoints written by examples/train_lora.py
#   $WORK/runs/<task>/consolidated  the last one as a vanilla PEFT adapter (train_lora.py --consolidate)
# Environment knobs: WORK, NPROC (processes = tensor-parallel size, default 2), STEPS (training steps, default 60).

set -euo pipefail

EXAMPLES_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
WORK="${WORK:-examples_output}"
NPROC="${NPROC:-2}"
STEPS="${STEPS:-60}"
mkdir -p "$WORK"

# The tiny model: 4 query heads and 1 key/value head, so at tp 2 the key/value head is replicated on both ranks.
ensure_base() {
    if [ ! -f "$WORK/base/config.json" ]; then
        echo "== building a tiny Llama in $WORK/base"
        python -c "from optimum_neuron_peft.demo.tiny_model import build_tiny_llama; build_tiny_llama('$WORK/base')"
    fi
}

# ensure_adapter TASK: train a LoRA adapter on the built-in task TASK (count_up or count_down) if not done yet.
ensure_adapter() {
    local task="$1"
    ensure_base
    if [ ! -f "$WORK/runs/$task/consolidated/adapter_config.json" ]; then
        echo "== training a LoRA adapter on '$task' with tensor parallelism over $NPROC processes"
        # --standalone: a free local port for the rendezvous. --tp-size defaults to the number of processes.
        # The learning rate, LoRA rank and alpha suit the tiny model.
        local resume=()  # a run that was interrupted continues from its latest checkpoint
        if compgen -G "$WORK/runs/$task/checkpoint-*/trainer_state.json" >/dev/null; then resume=(--resume); fi
        torchrun --standalone --nproc-per-node "$NPROC" "$EXAMPLES_DIR/train_lora.py" \
            --model-dir "$WORK/base" --output-dir "$WORK/runs/$task" --task "$task" \
            --steps "$STEPS" --save-every "$STEPS" --log-every 20 \
            --batch-size 8 --seq-len 24 --learning-rate 3e-3 --lora-r 8 --lora-alpha 16 \
            --consolidate "${resume[@]}"
    fi
}

# last_checkpoint TASK: the sharded adapter checkpoint of the last step of that run.
last_checkpoint() {
    local dir
    dir="$(ls -d "$WORK/runs/$1"/checkpoint-* | sort -t- -k2 -n | tail -n 1)"
    echo "$dir/adapter"
}
