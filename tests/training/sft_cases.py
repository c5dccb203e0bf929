"""The tiny chat setup shared by the SFT tests, and the two runs they compare: TRL's SFTTrainer on the Transformers
model with vanilla PEFT (one process), and our SFTTrainer at some tp size (in every rank of a spawn)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import datasets
import peft
import torch
import transformers

CHAT = Path(__file__).resolve().parents[2] / "examples" / "data" / "chat.jsonl"
CONVERSATIONS = [json.loads(line) for line in CHAT.read_text(encoding="utf-8").splitlines()]
# "wrapped" packing to 32 tokens; 4 optimizer steps of 2 x 2 rows; clipping that acts
ARGS = dict(max_length=32, packing=True, assistant_only_loss=True, per_device_train_batch_size=2,
            gradient_accumulation_steps=2, max_steps=4, learning_rate=1e-2, lr_scheduler_type="linear",
            warmup_steps=1, logging_steps=1, save_strategy="no", report_to="none", seed=0, use_cpu=True,
            disable_tqdm=True, max_grad_norm=0.5, per_device_eval_batch_size=3)  # fmt: skip
LOG_KEYS = ("loss", "grad_norm", "learning_rate")


def make_setup(root: Path) -> None:
    """root/base (tokenizer + tiny Llama), root/adapter (vanilla PEFT, non-zero B), root/chat.jsonl (40 chats)."""
    from optimum_neuron_peft.demo.chat_tokenizer import build_chat_tokenizer, message_texts
    from optimum_neuron_peft.demo.tiny_model import TinyModelSpec, build_tiny_llama

    tokenizer = build_chat_tokenizer(message_texts(CONVERSATIONS), root / "base")
    build_tiny_llama(root / "base", TinyModelSpec(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64))
    model = transformers.AutoModelForCausalLM.from_pretrained(root / "base", dtype=torch.float32)
    torch.manual_seed(1)
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", init_lora_weights=False)
    peft.get_peft_model(model, config).save_pretrained(str(root / "adapter"))
    (root / "chat.jsonl").write_text("".join(json.dumps(c) + "\n" for c in CONVERSATIONS[:40]), encoding="utf-8")


def logs(trainer) -> list[dict]:
    """The training logs, then the final evaluation's loss."""
    history = trainer.state.log_history
    return [{k: e[k] for k in LOG_KEYS} for e in history if "loss" in e] + [{"eval_loss": history[-1]["eval_loss"]}]


def trl_run(root: Path) -> tuple[list[dict], Any]:
    import trl

    model = transformers.AutoModelForCausalLM.from_pretrained(root / "base", dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(model, str(root / "adapter"), is_trainable=True)
    args = trl.SFTConfig(output_dir=str(root / "trl"), bf16=False, gradient_checkpointing=False,
                         packing_strategy="wrapped", **ARGS)  # fmt: skip
    data = datasets.Dataset.from_list(CONVERSATIONS[:40])
    tokenizer = transformers.AutoTokenizer.from_pretrained(root / "base")
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                             eval_dataset=datasets.Dataset.from_list(CONVERSATIONS[40:60]))  # fmt: skip
    trainer.train()
    trainer.state.log_history.append(trainer.evaluate())
    trainer.save_model(str(root / "trl" / "final"))
    return logs(trainer), trainer


def our_run(root: Path, name: str, tp: int, sequence_parallel: bool = False, train_dataset: Any = None):
    """Our SFTTrainer on our model at tp with the same vanilla adapter; returns (logs, trainer, batch shapes)."""
    from optimum_neuron_peft.models import AutoModelForCausalLM
    from optimum_neuron_peft.parallel import destroy_model_parallel, initialize_model_parallel
    from optimum_neuron_peft.peft import PeftModel
    from optimum_neuron_peft.training import SFTConfig, SFTTrainer

    initialize_model_parallel(tensor_model_parallel_size=tp)
    try:
        model = AutoModelForCausalLM.from_pretrained(root / "base", torch_dtype=torch.float32,
                                                     sequence_parallel=sequence_parallel)  # fmt: skip
        model = PeftModel.from_pretrained(model, root / "adapter", is_trainable=True)
        tokenizer = transformers.AutoTokenizer.from_pretrained(root / "base")
        data = train_dataset if train_dataset is not None else datasets.Dataset.from_list(CONVERSATIONS[:40])
        trainer = SFTTrainer(model=model, args=SFTConfig(output_dir=str(root / name), **ARGS), train_dataset=data,
                             processing_class=tokenizer, eval_dataset=datasets.Dataset.from_list(CONVERSATIONS[40:60]))
        shapes = {tuple(v.shape) for b in trainer.get_train_dataloader() for v in b.values()}
        shapes |= {("eval", *v.shape) for b in trainer.get_eval_dataloader() for v in b.values()}
        trainer.train()
        trainer.state.log_history.append(trainer.evaluate())
        trainer.save_model(str(root / name / "final"))
    finally:
        destroy_model_parallel()
    return logs(trainer), trainer, shapes


def tp_worker(rank: int, world: int, root: str, tp: int) -> tuple[list[dict], set] | None:
    """Our SFTTrainer at tp with sequence parallelism, reading the dataset from a .jsonl file."""
    history, _, shapes = our_run(Path(root), f"tp{tp}", tp, sequence_parallel=True,
                                 train_dataset=str(Path(root) / "chat.jsonl"))  # fmt: skip
    return (history, shapes) if rank == 0 else None
