"""Benchmark: optimizer-step time of our Trainer against transformers.Trainer + vanilla PEFT, same model and data.

One process, tp = 1, fp32, LoRA on every projection of a small Llama. Both trainers run the same steps
(`--warmup` untimed, then `--steps` timed by one callback between on_step_begin and on_step_end: forward, backward,
gradient sync, clipping, optimizer and scheduler step). The median step time and tokens/s are printed side by side,
in alternating order over `--repeats` rounds. The difference is what our Trainer adds at tp 1: the tensor-parallel
model and LoRA layers, the global-norm computation and the throughput metrics.

    flock /tmp/cpu.lock python bench/bench_trainer.py [--hidden 512] [--layers 4] [--seq 128] [--batch 4]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import transformers


class StepTimer(transformers.TrainerCallback):
    def __init__(self) -> None:
        self.times: list[float] = []

    def on_step_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self.start)


def run(kind: str, base: Path, out: Path, data, cli: argparse.Namespace) -> list[float]:
    import peft

    lora = peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear")
    common = dict(output_dir=str(out), per_device_train_batch_size=cli.batch, max_steps=cli.warmup + cli.steps,
                  learning_rate=1e-4, logging_steps=1, save_strategy="no", report_to="none", use_cpu=True,
                  disable_tqdm=True, seed=0)  # fmt: skip
    timer = StepTimer()
    if kind == "transformers":
        model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        model = peft.get_peft_model(model, lora)
        trainer = transformers.Trainer(model=model, args=transformers.TrainingArguments(**common), train_dataset=data,
                                       data_collator=transformers.default_data_collator, callbacks=[timer])  # fmt: skip
    else:
        from optimum_neuron_peft.parallel import destroy_model_parallel
        from optimum_neuron_peft.training import Trainer, TrainingArguments

        destroy_model_parallel()
        trainer = Trainer(model=str(base), args=TrainingArguments(**common), train_dataset=data, peft_config=lora,
                          data_collator=transformers.default_data_collator, callbacks=[timer])  # fmt: skip
    trainer.train()
    return timer.times[cli.warmup:]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--intermediate", type=int, default=1536)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--repeats", type=int, default=2)
    cli = p.parse_args()
    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        torch.manual_seed(0)
        config = transformers.LlamaConfig(
            vocab_size=cli.vocab, hidden_size=cli.hidden, intermediate_size=cli.intermediate,
            num_hidden_layers=cli.layers, num_attention_heads=cli.heads, num_key_value_heads=cli.kv_heads,
            max_position_embeddings=cli.seq,
        )  # fmt: skip
        transformers.LlamaForCausalLM(config).save_pretrained(tmp / "base")
        g = torch.Generator().manual_seed(1)
        rows = (cli.warmup + cli.steps) * cli.batch
        data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, cli.vocab, (rows, cli.seq), generator=g)]
        times: dict[str, list[float]] = {"transformers": [], "ours": []}
        for r in range(cli.repeats):
            order = ["transformers", "ours"] if r % 2 == 0 else ["ours", "transformers"]
            for kind in order:
                times[kind] += run(kind, tmp / "base", tmp / f"{kind}{r}", data, cli)
    tokens = cli.batch * cli.seq
    print(f"hidden {cli.hidden}, {cli.layers} layers, seq {cli.seq}, batch {cli.batch}, LoRA r16 all-linear, "
          f"{cli.steps} timed steps x {cli.repeats} rounds, 1 thread")  # fmt: skip
    print(f"{'trainer':<14}{'median step s':>15}{'min':>9}{'max':>9}{'tokens/s':>11}")
    for kind, values in times.items():
        median = statistics.median(values)
        print(f"{kind:<14}{median:>15.4f}{min(values):>9.4f}{max(values):>9.4f}{tokens / median:>11.1f}")
    ratio = statistics.median(times["ours"]) / statistics.median(times["transformers"])
    print(f"ours / transformers: {ratio:.3f}")


if __name__ == "__main__":
    main()
