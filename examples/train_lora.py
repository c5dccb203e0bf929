"""Tensor-parallel LoRA fine-tuning of a Llama-family model, on any torch.distributed backend.

Launch one process per device with torchrun:

    torchrun --standalone --nproc-per-node 2 examples/train_lora.py --model-dir tiny-llama --output-dir runs/lora \
        --steps 200 --learning-rate 3e-3 --consolidate

What it does, step by step:

1. joins the process group (gloo on CPU, nccl when CUDA is available, or ``--backend xla`` on Trainium) and splits
   the world into tensor-parallel groups of ``--tp-size`` ranks (the rest is data parallelism);
2. loads the Transformers checkpoint in ``--model-dir`` sharded over the tensor-parallel group and adds LoRA with
   a config written in the ORIGINAL module names (``q_proj``, ``gate_proj``...), exactly as for vanilla PEFT;
3. trains on the built-in synthetic task (``--task``) or on a plain-text file (``--data``) tokenized with the
   model directory's tokenizer, logging the loss on rank 0 every ``--log-every`` steps;
4. every ``--save-every`` steps and at the end writes ``<output-dir>/checkpoint-<step>/``:
       adapter/                  the sharded adapter checkpoint (the PEFT model's collective ``save_pretrained``)
       optimizer/rank_<R>.pt     each rank's optimizer state and RNG state
       trainer_state.json        step, layout and loss history; written last, so it marks a complete checkpoint
5. ``--resume`` continues from the latest complete checkpoint: rank 0 consolidates its adapter into a vanilla PEFT
   adapter, every rank loads it (bit-exact slicing) and its own optimizer state, and the data stream skips the
   steps already done, so the result equals an uninterrupted run;
6. ``--consolidate`` turns the last checkpoint into a vanilla PEFT adapter directory, ``<output-dir>/consolidated``,
   which ``peft.PeftModel.from_pretrained(transformers_model, <output-dir>/consolidated)`` loads.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist

LLAMA_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")
CHECKPOINT_RE = re.compile(r"checkpoint-(\d+)$")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    g = p.add_argument_group("model and parallelism")
    g.add_argument("--model-dir", required=True, help="Transformers model directory (config.json + safetensors)")
    g.add_argument("--tp-size", type=int, default=None, help="tensor-parallel size (default: the world size)")
    g.add_argument("--backend", choices=["gloo", "nccl", "xla"], default=None,
                   help="process-group backend (default: nccl when CUDA is available, else gloo)")
    g.add_argument("--device", default=None, help="cpu, cuda or xla (default: follows the backend)")
    g.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="dtype of the base weights")
    g.add_argument("--fuse-qkv", action="store_true", help="one fused qkv weight instead of weight_q/k/v")
    g.add_argument("--sequence-parallel", action="store_true", help="shard activations along the sequence")
    g = p.add_argument_group("LoRA")
    g.add_argument("--lora-r", type=int, default=16)
    g.add_argument("--lora-alpha", type=float, default=32)
    g.add_argument("--lora-dropout", type=float, default=0.0)
    g.add_argument("--target-modules", nargs="+", default=LLAMA_PROJECTIONS, help="ORIGINAL module names")
    g.add_argument("--use-rslora", action="store_true", help="scale by alpha / sqrt(r) instead of alpha / r")
    g = p.add_argument_group("data")
    g.add_argument("--task", choices=["count_up", "count_down"], default="count_up",
                   help="built-in synthetic task, used when --data is not given")
    g.add_argument("--data", default=None, help="plain-text file, tokenized with the tokenizer of --model-dir")
    g.add_argument("--batch-size", type=int, default=8, help="sequences per step, over all data-parallel replicas")
    g.add_argument("--seq-len", type=int, default=128)
    g = p.add_argument_group("training")
    g.add_argument("--steps", type=int, default=100, help="total optimizer steps (a resumed run counts from 0)")
    g.add_argument("--learning-rate", type=float, default=2e-4)
    g.add_argument("--seed", type=int, default=0, help="seeds the initial adapter and the data order")
    g.add_argument("--log-every", type=int, default=10)
    g = p.add_argument_group("checkpoints")
    g.add_argument("--output-dir", required=True)
    g.add_argument("--save-every", type=int, default=50)
    g.add_argument("--resume", action="store_true",
                   help="continue from the latest checkpoint in --output-dir (same processes, --tp-size, data and "
                        "training options; the LoRA options are the checkpoint's)")  # fmt: skip
    g.add_argument("--consolidate", action="store_true",
                   help="at the end, write the last checkpoint as a vanilla PEFT adapter to <output-dir>/consolidated")
    args = p.parse_args(argv)
    for name in ("steps", "batch_size", "seq_len", "save_every", "log_every", "lora_r"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args


# -- data: the same stream of batches on every rank, a pure function of the seed --------------------------------


def synthetic_batches(task: str, batch_size: int, seq_len: int, vocab_size: int, seed: int) -> Iterator[torch.Tensor]:
    from optimum_neuron_peft.demo.task import make_batch

    generator = torch.Generator().manual_seed(seed)
    while True:
        yield make_batch(task, batch_size, seq_len, vocab_size, generator)


def tokenize_text_file(path: Path, model_dir: Path, vocab_size: int) -> torch.Tensor:
    if not path.is_file():
        raise ValueError(f"--data {path}: no such file; give a plain-text file, or leave --data out to use --task")
    if not any((model_dir / name).is_file() for name in TOKENIZER_FILES):
        raise ValueError(
            f"--data {path}: {model_dir} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); save the model's "
            "tokenizer there, or leave --data out to train on the built-in --task"
        )
    from transformers import AutoTokenizer

    ids = torch.tensor(AutoTokenizer.from_pretrained(model_dir)(path.read_text())["input_ids"], dtype=torch.long)
    if ids.numel() and int(ids.max()) >= vocab_size:
        raise ValueError(f"--data {path}: token id {int(ids.max())} is outside the model's vocabulary ({vocab_size})")
    return ids


def text_batches(ids: torch.Tensor, batch_size: int, seq_len: int, seed: int) -> Iterator[torch.Tensor]:
    """Random windows of ``seq_len`` tokens."""
    if ids.numel() < seq_len:
        raise ValueError(f"--data has {ids.numel()} tokens, fewer than --seq-len {seq_len}")
    generator = torch.Generator().manual_seed(seed)
    while True:
        starts = torch.randint(0, ids.numel() - seq_len + 1, (batch_size,), generator=generator)
        yield torch.stack([ids[s : s + seq_len] for s in starts.tolist()])


# -- checkpoints ----------------------------------------------------------------------------------------------


def complete_checkpoints(output_dir: Path) -> list[Path]:
    """``checkpoint-<step>`` directories whose trainer_state.json exists, oldest first."""
    found = [
        d for d in output_dir.glob("checkpoint-*")
        if CHECKPOINT_RE.search(d.name) and (d / "trainer_state.json").is_file()
    ]  # fmt: skip
    return sorted(found, key=lambda d: int(CHECKPOINT_RE.search(d.name).group(1)))


def save_checkpoint(output_dir: Path, peft_model, optimizer, step: int, losses: list[float], layout: dict) -> Path:
    rank = dist.get_rank()
    directory = output_dir / f"checkpoint-{step}"
    peft_model.save_pretrained(directory / "adapter")  # collective over the tp group; atomic
    (directory / "optimizer").mkdir(parents=True, exist_ok=True)
    torch.save({"optimizer": optimizer.state_dict(), "rng": torch.get_rng_state()},
               directory / "optimizer" / f"rank_{rank:05d}.pt")  # fmt: skip
    dist.barrier()  # every rank's files exist before rank 0 marks the checkpoint complete
    if rank == 0:
        state = {"step": step, **layout, "losses": losses}
        (directory / "trainer_state.json").write_text(json.dumps(state, indent=1) + "\n")
    dist.barrier()
    return directory


def load_adapter_from_checkpoint(model, checkpoint: Path, output_dir: Path):
    """Rank 0 consolidates the sharded adapter into a vanilla PEFT adapter; every rank loads it (bit-exact)."""
    from optimum_neuron_peft.checkpoint.consolidate import consolidate
    from optimum_neuron_peft.peft import PeftModel

    vanilla = output_dir / ".resume-adapter"
    if dist.get_rank() == 0:
        consolidate(checkpoint / "adapter", vanilla, overwrite=True)
    dist.barrier()
    peft_model = PeftModel.from_pretrained(model, vanilla, is_trainable=True)
    dist.barrier()  # everyone has read it
    if dist.get_rank() == 0:
        shutil.rmtree(vanilla)
    return peft_model


def build_peft_model(args: argparse.Namespace, model_dir: Path, output_dir: Path, checkpoint: Path | None,
                     layout: dict):  # fmt: skip
    """The base model sharded over the tensor-parallel group, with a new LoRA adapter or the checkpoint's.

    Returns (PEFT model, steps done, loss history).
    """
    from peft import LoraConfig

    from optimum_neuron_peft.models import AutoModelForCausalLM
    from optimum_neuron_peft.peft import get_peft_model

    model = AutoModelForCausalLM.from_pretrained(
        model_dir, torch_dtype=getattr(torch, args.dtype), fuse_qkv=args.fuse_qkv,
        sequence_parallel=args.sequence_parallel,
    )  # fmt: skip
    if checkpoint is not None:  # the LoRA config comes from the checkpoint
        state = json.loads((checkpoint / "trainer_state.json").read_text())
        if {k: state[k] for k in layout} != layout:
            raise ValueError(f"--resume: {checkpoint} was saved with {({k: state[k] for k in layout})}, this run "
                             f"has {layout}; the optimizer state is per rank, resume with the same layout")  # fmt: skip
        return load_adapter_from_checkpoint(model, checkpoint, output_dir), state["step"], state["losses"]
    torch.manual_seed(args.seed)  # the same initial adapter on every rank and at every tp size
    config = LoraConfig(
        r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
        target_modules=args.target_modules, use_rslora=args.use_rslora, task_type="CAUSAL_LM",
        base_model_name_or_path=str(model_dir),  # recorded in adapter_config.json, as vanilla PEFT does
    )  # fmt: skip
    return get_peft_model(model, config), 0, []


# -- distributed setup ----------------------------------------------------------------------------------------


def init_process_group(backend: str | None) -> tuple[int, int]:
    from optimum_neuron_peft.parallel import init_distributed_from_env

    # gloo / nccl from torchrun's environment; "xla" (Trainium, untested here) rendezvous through "xla://"
    return init_distributed_from_env(backend)


def pick_device(args: argparse.Namespace) -> torch.device:
    if args.backend == "xla" or args.device == "xla":
        import torch_xla.core.xla_model as xm

        return xm.xla_device()
    if args.device is not None:
        return torch.device(args.device)
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def mark_step(device: torch.device) -> None:
    """XLA executes the graph traced so far at this call; a no-op on other devices."""
    if device.type == "xla":
        import torch_xla.core.xla_model as xm

        xm.mark_step()


# -- training -------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from transformers import AutoConfig

    from optimum_neuron_peft.parallel import (
        destroy_model_parallel,
        get_data_parallel_group,
        get_data_parallel_rank,
        get_data_parallel_size,
        initialize_model_parallel,
    )
    from optimum_neuron_peft.parallel.zero import allreduce_data_parallel_gradients

    model_dir, output_dir = Path(args.model_dir), Path(args.output_dir)
    # Checks every rank makes before joining the group, so that a user error stops all ranks with one message.
    vocab_size = AutoConfig.from_pretrained(model_dir).vocab_size
    checkpoints = complete_checkpoints(output_dir) if output_dir.is_dir() else []
    if checkpoints and not args.resume:
        raise ValueError(f"{output_dir}: already holds {checkpoints[-1].name}; pass --resume to continue from it, "
                         "or choose another --output-dir")  # fmt: skip
    if args.resume and not checkpoints:
        raise ValueError(f"--resume: no complete checkpoint-<step> directory in {output_dir}")
    token_ids = tokenize_text_file(Path(args.data), model_dir, vocab_size) if args.data else None

    rank, world_size = init_process_group(args.backend)
    tp_size = args.tp_size or world_size
    initialize_model_parallel(tensor_model_parallel_size=tp_size)  # refuses a tp size that does not divide the world
    dp_size, dp_rank = get_data_parallel_size(), get_data_parallel_rank()
    if args.batch_size % dp_size:
        raise ValueError(f"--batch-size {args.batch_size} must divide by the data-parallel size {dp_size}")
    device = pick_device(args)
    layout = {"world_size": world_size, "tp_size": tp_size}
    log = print if rank == 0 else (lambda *a, **k: None)

    checkpoint = checkpoints[-1] if args.resume else None
    peft_model, start_step, losses = build_peft_model(args, model_dir, output_dir, checkpoint, layout)
    if checkpoint is not None:
        log(f"resuming from {checkpoint} (step {start_step})")
    peft_model.to(device)
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.learning_rate, weight_decay=0.0)
    if checkpoint is not None:
        saved = torch.load(checkpoint / "optimizer" / f"rank_{rank:05d}.pt", weights_only=True)
        optimizer.load_state_dict(saved["optimizer"])
        torch.set_rng_state(saved["rng"])  # LoRA dropout continues with the same masks
    n_trainable = sum(p.numel() for p in trainable)
    log(f"world {world_size} = tp {tp_size} x dp {dp_size}, device {device}, {n_trainable} trainable LoRA "
        f"parameters on this rank")  # fmt: skip

    # Every rank draws the same global batch; each data-parallel replica trains on its slice of the rows.
    if token_ids is None:
        stream = synthetic_batches(args.task, args.batch_size, args.seq_len, vocab_size, args.seed + 1)
    else:
        stream = text_batches(token_ids, args.batch_size, args.seq_len, args.seed + 1)
    rows = args.batch_size // dp_size
    stream = itertools.islice(stream, start_step, args.steps)  # skip the batches a resumed run already used

    peft_model.train()
    t0 = time.perf_counter()
    for step, batch in enumerate(stream, start=start_step + 1):
        input_ids = batch[dp_rank * rows : (dp_rank + 1) * rows].to(device)
        loss = peft_model(input_ids=input_ids, labels=input_ids, return_logits=False).loss
        loss.backward()
        # sequence-parallel gradients are already complete here (reduced in backward)
        allreduce_data_parallel_gradients(trainable)  # mean over data-parallel replicas, in fp32; no-op at dp 1
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        mark_step(device)
        loss = loss.detach()
        if dp_size > 1:
            dist.all_reduce(loss, group=get_data_parallel_group())
            loss /= dp_size
        losses.append(float(loss))  # the full-vocabulary loss, identical on every tp rank
        if step % args.log_every == 0 or step == args.steps:
            seconds = (time.perf_counter() - t0) / (step - start_step)
            log(f"step {step}/{args.steps}  loss {losses[-1]:.4f}  ({seconds:.3f} s/step)")
        if step % args.save_every == 0 or step == args.steps:
            log(f"saved {save_checkpoint(output_dir, peft_model, optimizer, step, losses, layout)}")

    if args.consolidate and rank == 0:
        from optimum_neuron_peft.checkpoint.consolidate import consolidate

        final = complete_checkpoints(output_dir)[-1]
        result = consolidate(final / "adapter", output_dir / "consolidated", overwrite=True)
        log(f"consolidated {final.name} into the vanilla PEFT adapter {result.output_dir}")
    destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main()
    except ValueError as err:  # a user error (the library's errors are ValueErrors too): one line, exit status 2
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
