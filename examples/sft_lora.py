"""Supervised fine-tuning (SFT) of a tiny Llama on the shipped chat dataset, tensor-parallel, then a chat with it.

    torchrun --standalone --nproc-per-node 2 examples/sft_lora.py --output-dir runs/sft --steps 100

What it does, step by step:

1. rank 0 builds, locally and without download, a word-level chat tokenizer from ``examples/data/chat.jsonl`` and a
   tiny random Llama with the matching vocabulary (``<output-dir>/base``); the other ranks wait for it;
2. `optimum_neuron_peft.training.SFTTrainer` loads that model sharded over ``--tp-size`` ranks (the default: every
   process; the rest would be data parallelism), adds LoRA from a config in the original module names, applies the
   chat template to the conversations, packs them into rows of exactly ``--max-length`` tokens and trains on the
   assistant turns only (every other token has the label -100);
3. it saves a sharded checkpoint (``<output-dir>/run/checkpoint-<steps>/adapter``), which rank 0 consolidates into a
   vanilla PEFT adapter (``<output-dir>/consolidated``) with `optimum_neuron_peft.checkpoint.consolidate`;
4. rank 0 loads the base model with plain Transformers, the adapter with plain PEFT, and generates a reply to
   ``--prompt`` through the chat template. ``<output-dir>/summary.json`` records the losses, the shapes of every
   training batch and the reply.

The dataset is rewritten by ``python examples/data/make_chat_data.py`` (deterministic). After a few dozen steps the
replies take the dataset's form ("2 plus 3 is ..."); the arithmetic itself needs a bigger model and longer training.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

CHAT_DATA = Path(__file__).resolve().parent / "data" / "chat.jsonl"
LLAMA_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    p.add_argument("--output-dir", required=True)
    p.add_argument("--data", default=str(CHAT_DATA), help="a .jsonl/.json/.parquet file of {'messages': [...]}")
    p.add_argument("--tp-size", type=int, default=None, help="tensor-parallel size (default: the world size)")
    p.add_argument("--steps", type=int, default=100, help="optimizer steps")
    p.add_argument("--max-length", type=int, default=64, help="tokens per packed row (every batch: batch x this)")
    p.add_argument("--batch-size", type=int, default=4, help="rows per data-parallel replica and step")
    p.add_argument("--learning-rate", type=float, default=1e-2)
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--lora-alpha", type=float, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompt", default="What is 2 plus 3 ?", help="the user message to answer at the end")
    p.add_argument("--max-new-tokens", type=int, default=16)
    return p.parse_args(argv)


def build_base(base: Path, data: Path) -> None:
    """Tokenizer from the dataset's words, and a tiny Llama whose vocabulary matches it (skipped if present)."""
    from optimum_neuron_peft.demo.chat_tokenizer import build_chat_tokenizer, message_texts
    from optimum_neuron_peft.demo.tiny_model import TinyModelSpec, build_tiny_llama

    if (base / "config.json").is_file() and (base / "tokenizer.json").is_file():
        return
    conversations = [json.loads(line) for line in data.read_text(encoding="utf-8").splitlines() if line.strip()]
    tokenizer = build_chat_tokenizer(message_texts(conversations), base)
    build_tiny_llama(base, TinyModelSpec(vocab_size=len(tokenizer)))
    print(f"built tokenizer ({len(tokenizer)} tokens) and tiny Llama in {base}", flush=True)


class ShapeRecorder:
    """Wraps the trainer's collator to record the shape of every batch it produces."""

    def __init__(self, collator):
        self.collator, self.shapes = collator, set()

    def __call__(self, examples):
        batch = self.collator(examples)
        self.shapes.update(tuple(v.shape) for v in batch.values())
        return batch


def chat(base: Path, adapter: Path, prompt: str, max_new_tokens: int) -> str:
    """Plain Transformers + PEFT: the base model, the consolidated adapter, a greedy reply through the template."""
    import peft
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(base)
    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(model, str(adapter)).eval()
    messages = [{"role": "user", "content": prompt}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from peft import LoraConfig

    from optimum_neuron_peft.checkpoint import consolidate
    from optimum_neuron_peft.parallel import init_distributed_from_env
    from optimum_neuron_peft.training import SFTConfig, SFTTrainer

    out = Path(args.output_dir)
    base = out / "base"
    rank, world = init_distributed_from_env("gloo") if "WORLD_SIZE" in os.environ else (0, 1)
    if rank == 0:
        build_base(base, Path(args.data))
    if dist.is_initialized():
        dist.barrier()

    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(base)
    config = SFTConfig(
        output_dir=str(out / "run"), tensor_parallel_size=args.tp_size or world, max_length=args.max_length,
        packing=True, assistant_only_loss=True, per_device_train_batch_size=args.batch_size, max_steps=args.steps,
        learning_rate=args.learning_rate, lr_scheduler_type="constant", logging_steps=max(1, args.steps // 10),
        save_strategy="steps", save_steps=args.steps, report_to="none", seed=args.seed, use_cpu=True,
    )  # fmt: skip
    lora = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=0.0, target_modules=LLAMA_PROJECTIONS,
                      task_type="CAUSAL_LM")  # fmt: skip
    trainer = SFTTrainer(model=str(base), args=config, train_dataset=args.data, processing_class=tokenizer,
                         peft_config=lora)  # fmt: skip
    recorder = trainer.data_collator = ShapeRecorder(trainer.data_collator)
    trainer.train()
    trainer.save_model(str(out / "adapter"))  # the same adapter, consolidated in memory by the trainer

    if rank == 0:
        checkpoint = out / "run" / f"checkpoint-{trainer.state.global_step}"
        consolidate(checkpoint / "adapter", out / "consolidated", overwrite=True)
        reply = chat(base, out / "consolidated", args.prompt, args.max_new_tokens)
        print(f"user: {args.prompt}\nassistant: {reply}", flush=True)
        losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
        summary = {"losses": losses, "batch_shapes": sorted(recorder.shapes), "prompt": args.prompt, "reply": reply,
                   "tensor_parallel_size": config.tensor_parallel_size, "world_size": world,
                   "steps": trainer.state.global_step}  # fmt: skip
        tmp = out / "summary.json.tmp"
        tmp.write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
        tmp.replace(out / "summary.json")
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
