"""`Trainer`: transformers.Trainer on our tensor-parallel models, training exactly like it does on one device.

transformers.Trainer keeps its loop, optimizer and scheduler construction, gradient-accumulation loss
normalisation (``num_items_in_batch``), logging, callbacks, ``report_to`` and progress bar. accelerate runs
single-process on every rank (`arguments.single_process_accelerate`); this class adds only what the layout needs:

- data: the training batches are sharded over the data-parallel group with accelerate's own sharding (what it does
  over the world under DDP); the tensor-parallel ranks of a replica see the same batches. Evaluation is not
  sharded: every replica evaluates the whole set (same result, no gather needed);
- loss: the token count is summed over the data-parallel group and the loss scaled by dp, as transformers does
  under DDP; the gradients are averaged over the data-parallel group (DDP's all-reduce, in fp32) after the last
  micro-batch (the sequence-parallel sums already happened in backward);
- optimizer: transformers' own, or with ``zero_1`` the same one sharded over the data-parallel group (ZeRO-1);
- bf16: built from a directory with ``bf16=True`` the base is bf16 (LoRA and optimizer state fp32), with no
  autocast over a bf16 base;
- clipping: the global norm of the logical model (`gradients.global_grad_norm`);
- logged losses: averaged over the data-parallel group;
- saving: `save_model` writes ONE vanilla PEFT adapter (or a Transformers model directory); checkpoints hold the
  sharded adapter, the optimizer state in original names (resumable at any tp / dp size), the scheduler, RNG and
  trainer state, written to a temporary directory and renamed.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import transformers
from torch import nn
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from ..errors import ConfigError
from ..parallel import (
    get_data_parallel_group,
    get_tensor_model_parallel_size,
    initialize_model_parallel,
    init_distributed_from_env,
    model_parallel_is_initialized,
)
from ..parallel.zero import allreduce_data_parallel_, allreduce_data_parallel_gradients, make_zero1_optimizer
from ..peft.model import PeftModel, load_original_adapter_weights, read_vanilla_adapter
from .arguments import TrainingArguments
from .metrics import ThroughputMeter, write_summary
from .gradients import clip_grads_with_norm_, global_grad_norm, norm_shares
from .optimizer_state import (
    OPTIMIZER_WEIGHTS,
    consolidated_optimizer_state,
    load_optimizer_state,
    save_optimizer_state,
)

TRAINER_STATE_NAME = "trainer_state.json"
SCHEDULER_NAME = "scheduler.pt"
LAYOUT_NAME = "layout.json"
SUMMARY_NAME = "training_summary.json"
ADAPTER_SUBDIR = "adapter"
MODEL_SUBDIR = "model"


# -- layout -----------------------------------------------------------------------------------------------------


def _ensure_process_groups(args: TrainingArguments) -> None:
    """Join torchrun's process group if the script has not, and create the tp / dp groups if needed."""
    if not (dist.is_available() and dist.is_initialized()) and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        init_distributed_from_env(args.ddp_backend)
    if not model_parallel_is_initialized():
        initialize_model_parallel(tensor_model_parallel_size=args.tensor_parallel_size or 1)
    found = get_tensor_model_parallel_size()
    if args.tensor_parallel_size is not None and args.tensor_parallel_size != found:
        raise ConfigError(f"TrainingArguments.tensor_parallel_size={args.tensor_parallel_size}, but the model "
                          f"parallel state is initialized with tensor-parallel size {found}")  # fmt: skip


def _base_model(model: nn.Module) -> nn.Module:
    return model.base_model.model if isinstance(model, PeftModel) else model


def _model_layout(model: nn.Module) -> dict[str, Any]:
    from ..models.causal_lm import ParallelForCausalLM
    from ..parallel.gqa import GQAQKVColumnParallelLinear

    base = _base_model(model)
    if not isinstance(base, ParallelForCausalLM):
        raise TypeError(f"Trainer: model must be a Transformers model directory, or a model of "
                        f"optimum_neuron_peft.models (optionally wrapped by optimum_neuron_peft.peft), got "
                        f"{type(model).__name__}")  # fmt: skip
    gqa = [m for m in base.modules() if isinstance(m, GQAQKVColumnParallelLinear)]
    return {
        "tensor_parallel_size": base.tp.size,
        "sequence_parallel": bool(base.plan.sequence_parallel),
        "fuse_qkv": bool(base.plan.fuse_qkv),
        "kv_size_multiplier": gqa[0].kv_size_multiplier if gqa else base.plan.kv_size_multiplier,
    }


def _adopt_model_layout(args: TrainingArguments, model: nn.Module) -> None:
    """Fill the layout fields left unset from the model; an explicit contradiction is an error."""
    for name, value in _model_layout(model).items():
        given = getattr(args, name)
        if given is not None and value is not None and given != value:
            raise ConfigError(f"TrainingArguments.{name}={given!r}, but the model was built with {name}={value!r}; "
                              f"leave it unset to take the model's")  # fmt: skip
        setattr(args, name, value)


def build_model(path: str | os.PathLike, args: TrainingArguments, peft_config: Any = None) -> nn.Module:
    """The tensor-parallel model of a Transformers directory for ``args``' layout, with LoRA from ``peft_config``
    (ORIGINAL module names) initialised after seeding with ``args.seed``, like vanilla PEFT after ``set_seed``."""
    from ..models import AutoModelForCausalLM

    if not (Path(path) / "config.json").is_file():
        raise ConfigError(f"Trainer: model {str(path)!r} is not a Transformers model directory (no config.json)")
    tp = args.tensor_parallel_size or 1
    args.tensor_parallel_size = tp
    if args.sequence_parallel is None:
        args.sequence_parallel = tp > 1
    # bf16 policy (docs/peft.md): a bf16 base; LoRA parameters, optimizer state and gradient sums stay fp32
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    model = AutoModelForCausalLM.from_pretrained(
        path, torch_dtype=dtype, fuse_qkv=bool(args.fuse_qkv), kv_size_multiplier=args.kv_size_multiplier,
        sequence_parallel=args.sequence_parallel,
    )  # fmt: skip
    if peft_config is not None:
        model = add_adapter(model, peft_config, args.seed)
    _adopt_model_layout(args, model)
    return model


def add_adapter(model: nn.Module, peft_config: Any, seed: int) -> PeftModel:
    """LoRA from a config in ORIGINAL module names, drawn right after seeding (the same adapter at every tp size)."""
    from ..peft import get_peft_model

    if isinstance(model, PeftModel):
        raise ConfigError("Trainer: peft_config was given with a model that already has an adapter")
    transformers.set_seed(seed)
    return get_peft_model(model, peft_config)


# -- the trainer ------------------------------------------------------------------------------------------------


class Trainer(transformers.Trainer):
    """transformers.Trainer for the tensor-parallel models of this package; see the module doc and
    docs/training.md. ``model`` is a Transformers model directory (built for ``args``' layout; with
    ``peft_config`` in original module names, LoRA is added) or a model / `PeftModel` of ours."""

    def __init__(
        self,
        model: nn.Module | str | os.PathLike | None = None,
        args: TrainingArguments | None = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        data_collator: Any = None,
        processing_class: Any = None,
        peft_config: Any = None,
        callbacks: list | None = None,
        **kwargs: Any,
    ) -> None:
        if args is None:
            args = TrainingArguments(output_dir="trainer_output")
        if not isinstance(args, TrainingArguments):
            raise TypeError(f"Trainer: args must be optimum_neuron_peft.training.TrainingArguments (it carries the "
                            f"tensor-parallel layout), got {type(args).__module__}.{type(args).__name__}")  # fmt: skip
        if model is None:
            raise ConfigError("Trainer: model is required (a Transformers model directory or a model of ours)")
        _ensure_process_groups(args)
        if isinstance(model, (str, os.PathLike)):
            model = build_model(model, args, peft_config)
        else:
            if peft_config is not None:
                model = add_adapter(model, peft_config, args.seed)
            _adopt_model_layout(args, model)
        if args.activation_checkpointing and not hasattr(_base_model(model), "activation_checkpointing_enable"):
            raise ConfigError("TrainingArguments.gradient_checkpointing: this model has no "
                              "activation_checkpointing_enable(); turn the option off")  # fmt: skip
        self._shares = None
        self._meter: ThroughputMeter | None = None
        super().__init__(
            model=model, args=args, data_collator=data_collator, train_dataset=train_dataset,
            eval_dataset=eval_dataset, processing_class=processing_class, callbacks=callbacks, **kwargs,
        )  # fmt: skip

    def _build_accelerator_args(self, **kwargs) -> dict[str, Any]:
        """No autocast over a bf16 base (the bf16 policy): accelerate's bf16 autocast would run the fp32 LoRA
        branch and the fp32 loss in bf16. An fp32 model with ``bf16=True`` keeps transformers' autocast."""
        accelerator_args = super()._build_accelerator_args(**kwargs)
        if any(p.dtype == torch.bfloat16 for p in _base_model(self.model).parameters()):
            accelerator_args["mixed_precision"] = "no"
        return accelerator_args

    # -- layout helpers ---------------------------------------------------------------------------------------

    @property
    def tp(self):
        return _base_model(self.model).tp

    @property
    def dp_size(self) -> int:
        return self.args.dp_size

    def _dp_average_(self, tensors) -> None:
        allreduce_data_parallel_(list(tensors), get_data_parallel_group())

    def _trainable(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    # -- data -------------------------------------------------------------------------------------------------

    def get_train_dataloader(self):
        with self._data_parallel_prepare():
            return super().get_train_dataloader()

    @contextlib.contextmanager
    def _data_parallel_prepare(self):
        """Make ``accelerator.prepare(dataloader)`` shard over our data-parallel group: accelerate's
        `prepare_data_loader` with the arguments `Accelerator.prepare_data_loader` passes, but dp's size and rank
        (no dispatching: that would broadcast over the world)."""
        from accelerate.data_loader import prepare_data_loader

        acc = self.accelerator

        def prepare(dataloader):
            return prepare_data_loader(
                dataloader, acc.device, num_processes=self.dp_size, process_index=self.args.dp_rank,
                split_batches=acc.split_batches, put_on_device=acc.device_placement, rng_types=acc.rng_types.copy(),
                dispatch_batches=False, even_batches=acc.even_batches, use_seedable_sampler=acc.use_seedable_sampler,
                data_seed=acc.dataloader_config.data_seed, non_blocking=acc.non_blocking,
                use_stateful_dataloader=acc.use_stateful_dataloader,
            )  # fmt: skip

        acc.prepare = prepare
        try:
            yield
        finally:
            del acc.prepare

    def get_total_train_batch_size(self, args: TrainingArguments) -> int:
        return self._train_batch_size * args.gradient_accumulation_steps * self.dp_size

    # -- loss and gradients -----------------------------------------------------------------------------------

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device):
        count = super()._get_num_items_in_batch(batch_samples, device)  # this rank's count (accelerate is single)
        if count is not None and self.args.average_tokens_across_devices and self.dp_size > 1:
            count = torch.as_tensor(count, device=device).clone()
            dist.all_reduce(count, group=get_data_parallel_group())
        return count

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                      num_items_in_batch=num_items_in_batch)  # fmt: skip
        if (
            self.dp_size > 1
            and self.args.average_tokens_across_devices
            and (self.model_accepts_loss_kwargs or self.compute_loss_func)
            and num_items_in_batch is not None
        ):
            # transformers scales by the number of data-parallel processes under DDP, whose averaging undoes it
            if return_outputs:
                return result[0] * self.dp_size, result[1]
            return result * self.dp_size
        return result

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self._meter is not None and torch.is_tensor(inputs.get("input_ids")):
            self._meter.micro_batch(inputs["input_ids"])
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.accelerator.sync_gradients:  # the last micro-batch of the optimizer step
            self._synchronize_gradients()
            if self._meter is not None:
                self._meter.optimizer_step()
        return loss

    def _synchronize_gradients(self) -> None:
        # sequence-parallel gradients are already summed over tp in backward (the model's hooks)
        if self.dp_size > 1:
            allreduce_data_parallel_gradients(self._trainable(), get_data_parallel_group())

    def create_optimizer(self, model=None):
        """transformers' optimizer (class, parameter groups, weight-decay split, hyper-parameters); with
        ``args.zero_1`` the same optimizer with its state sharded over the data-parallel group (ZeRO-1)."""
        optimizer = super().create_optimizer(model)
        if self.args.zero_1 and self.dp_size > 1 and not _is_sharded(optimizer):
            if optimizer.state:
                raise ConfigError("TrainingArguments.zero_1: the optimizer already holds state; cannot shard it")
            # the class and keyword arguments transformers built it with; the groups carry the weight-decay split
            optimizer_cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, self.model)
            if type(optimizer) is not optimizer_cls or {"params", "model", "optimizer_dict"} & set(kwargs):
                raise ConfigError(f"TrainingArguments.zero_1: optim={self.args.optim!r} builds "
                                  f"{type(optimizer).__name__}, which ZeRO-1 cannot shard; "
                                  "use a torch.optim optimizer")  # fmt: skip
            groups = [{k: v for k, v in g.items() if k == "params" or k not in kwargs} for g in optimizer.param_groups]
            self.optimizer = make_zero1_optimizer(groups, optimizer_cls, get_data_parallel_group(), **kwargs)
            self._skip_state_round_trip(self.optimizer)
        return self.optimizer

    def _skip_state_round_trip(self, sharded: torch.optim.Optimizer) -> None:
        """accelerate's device placement round-trips the optimizer's state_dict, which a sharded optimizer only
        gives after a collective consolidation; its (lazily created) state already lives on the parameters'
        device, so prepare it without placement."""
        acc = self.accelerator
        prepare_optimizer = type(acc).prepare_optimizer.__get__(acc)

        def prepare(optimizer, device_placement=None):
            return prepare_optimizer(optimizer, device_placement=False if optimizer is sharded else device_placement)

        acc.prepare_optimizer = prepare

    def _norm_shares(self):
        if self._shares is None:
            self._shares = norm_shares(self.model, self.tp)
        return self._shares

    def _clip_grad_norm(self, model):
        total = global_grad_norm(self._norm_shares(), self.tp)
        clip_grads_with_norm_(self._trainable(), self.args.max_grad_norm, total)
        return total

    def _get_grad_norm(self, model, grad_norm=None):
        return global_grad_norm(self._norm_shares(), self.tp) if grad_norm is None else grad_norm

    # -- logging ----------------------------------------------------------------------------------------------

    def train(self, *args, **kwargs):
        self._shares = None  # the trainable parameters may have changed since a previous call
        self._meter = ThroughputMeter(self._flops_of_batch(), self.args.world_size, get_data_parallel_group(),
                                      self._peak_flops_per_device())  # fmt: skip
        if not self.args.activation_checkpointing:
            return super().train(*args, **kwargs)
        # transformers' own handling (it would call the PeftModel, whose enable does not reach our layers):
        # every_n_layers and offload come out of the kwargs, the rest go to torch.utils.checkpoint.checkpoint
        ckpt_kwargs = dict(self.args.activation_checkpointing_kwargs or {})
        every_n_layers = ckpt_kwargs.pop("every_n_layers", 1)
        if ckpt_kwargs.pop("offload", False):
            raise ConfigError("TrainingArguments.activation_checkpointing_kwargs: offload=True is not supported; "
                              "the checkpointed activations stay on the device")  # fmt: skip
        _base_model(self.model).activation_checkpointing_enable(ckpt_kwargs or None, every_n_layers=every_n_layers)
        self.args.activation_checkpointing = False
        try:
            return super().train(*args, **kwargs)
        finally:
            self.args.activation_checkpointing = True

    def _flops_of_batch(self):
        """FLOPs of one micro-batch (batch, seq) of the whole model with its frozen base, or None when unknown."""
        if not isinstance(self.model, PeftModel):
            return None
        from .flops import model_step_flops

        config, lora = _base_model(self.model).config, self.model.original_peft_config("default")
        cache: dict[tuple[int, int], float] = {}

        def flops(batch: int, seq: int) -> float:
            if (batch, seq) not in cache:
                cache[batch, seq] = float(model_step_flops(config, lora, batch, seq).total)
            return cache[batch, seq]

        return flops

    def _peak_flops_per_device(self) -> float | None:
        if self.args.peak_flops_per_device is not None:
            return float(self.args.peak_flops_per_device)
        if self.args.hardware is None:
            return None
        from .flops import peak_flops

        dtype = "bf16" if self.args.bf16 or next(self.model.parameters()).dtype == torch.bfloat16 else "fp32"
        return peak_flops(self.args.hardware, dtype)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self._meter is not None and "loss" in logs and "learning_rate" in logs:  # a training window, every rank
            logs = {**logs, **self._meter.window()}
        super().log(logs, start_time)

    def _maybe_log_save_evaluate(self, tr_loss, grad_norm, model, trial, epoch, ignore_keys_for_eval, start_time,
                                 learning_rate=None):  # fmt: skip
        if self.control.should_log and self.state.global_step > self._globalstep_last_logged and self.dp_size > 1:
            self._dp_average_([tr_loss])
        super()._maybe_log_save_evaluate(tr_loss, grad_norm, model, trial, epoch, ignore_keys_for_eval, start_time,
                                         learning_rate=learning_rate)  # fmt: skip

    def _track_num_input_tokens(self, inputs) -> None:
        before = self.state.num_input_tokens_seen
        super()._track_num_input_tokens(inputs)  # this replica's tokens (accelerate's gather is single-process)
        if self.args.include_num_input_tokens_seen != "no" and self.dp_size > 1:
            added = torch.tensor(self.state.num_input_tokens_seen - before, dtype=torch.int64)
            dist.all_reduce(added, group=get_data_parallel_group())
            self.state.num_input_tokens_seen = before + int(added)

    def _finalize_training(self, trial, num_train_samples, start_time):
        if self.dp_size > 1:
            self._dp_average_([self._tr_loss])
        output = super()._finalize_training(trial, num_train_samples, start_time)
        if self._meter is not None and self.args.should_save:
            Path(self.args.output_dir).mkdir(parents=True, exist_ok=True)
            write_summary(Path(self.args.output_dir) / SUMMARY_NAME,
                          {**self._meter.summary(), "train_loss": output.training_loss})  # fmt: skip
        return output

    # -- saving -----------------------------------------------------------------------------------------------

    def _barrier(self) -> None:
        if dist.is_available() and dist.is_initialized():
            dist.barrier()

    def _broadcast(self, value: Any) -> Any:
        if not (dist.is_available() and dist.is_initialized()):
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Write ONE vanilla PEFT adapter directory (or, without adapter, a Transformers model directory) at
        ``output_dir``. Collective: every rank calls it; global rank 0 writes, atomically per file."""
        output_dir = Path(output_dir if output_dir is not None else self.args.output_dir)
        staging = self._broadcast(self._staging_dir(output_dir.parent, f".{output_dir.name}.saving-"))
        if isinstance(self.model, PeftModel):
            tensors = self.model.consolidated_adapter_state_dict("default")  # collective over tp
            if self.args.should_save:
                from safetensors.torch import save_file

                from ..transformations.names import ADAPTER_WEIGHTS_NAME, PEFT_WRAPPER_PREFIX

                save_file({PEFT_WRAPPER_PREFIX + k: v.contiguous() for k, v in tensors.items()},
                          str(staging / ADAPTER_WEIGHTS_NAME), metadata={"format": "pt"})  # fmt: skip
                self.model.original_peft_config("default").save_pretrained(str(staging))
        else:
            from ..checkpoint import consolidate

            sharded = staging / "sharded"
            _base_model(self.model).save_pretrained(sharded)  # collective over tp
            self._barrier()
            if self.args.should_save:
                consolidate(sharded, staging / "consolidated", overwrite=True)
                shutil.rmtree(sharded)
                for f in (staging / "consolidated").iterdir():
                    f.rename(staging / f.name)
                (staging / "consolidated").rmdir()
        if self.args.should_save:
            if self.processing_class is not None:
                self.processing_class.save_pretrained(str(staging))
            output_dir.mkdir(parents=True, exist_ok=True)
            for f in staging.iterdir():
                os.replace(f, output_dir / f.name)  # each file appears whole
            staging.rmdir()
        self._barrier()

    def _staging_dir(self, parent: Path, prefix: str) -> Path | None:
        if not self.args.should_save:
            return None
        parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=prefix, dir=parent))

    def _save_checkpoint(self, model, trial) -> None:
        """``checkpoint-N/``: adapter/ (sharded), optimizer.safetensors + optimizer.json (original names),
        scheduler.pt, rng_state_<rank>.pth, layout.json, trainer_state.json. Written under a temporary name and
        renamed when complete, so a kill during the save leaves the previous checkpoints as they were."""
        self.store_flos()
        run_dir = Path(self._get_output_dir(trial=trial))
        final = run_dir / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging = self._broadcast(self._staging_dir(run_dir, f".{final.name}.saving-"))
        self._barrier()
        if isinstance(self.model, PeftModel):
            self.model.save_pretrained(staging / ADAPTER_SUBDIR)  # collective over tp; dp replica 0 writes
        else:
            _base_model(self.model).save_pretrained(staging / MODEL_SUBDIR)
        if not self.args.save_only_model:
            if isinstance(self.model, PeftModel):
                tensors, rest = consolidated_optimizer_state(self.model, self.optimizer)  # collective over tp
                if self.args.should_save:
                    save_optimizer_state(staging, tensors, rest)
            if self.args.should_save and self.lr_scheduler is not None:
                torch.save(self.lr_scheduler.state_dict(), staging / SCHEDULER_NAME)
            torch.save(_rng_state(), staging / f"rng_state_{self.args.process_index}.pth")
        best = self.state.best_global_step
        if best and self.args.save_strategy in ("steps", "epoch", "best"):
            best_dir = run_dir / f"{PREFIX_CHECKPOINT_DIR}-{best}"
            if best == self.state.global_step or best_dir.is_dir():
                self.state.best_model_checkpoint = str(best_dir)
        if self.args.should_save:
            for cb in [c for c in self.callback_handler.callbacks + [self.control]
                       if isinstance(c, transformers.trainer_callback.ExportableState)]:  # fmt: skip
                name = cb.__class__.__name__
                if isinstance(self.state.stateful_callbacks.get(name), list):
                    self.state.stateful_callbacks[name].append(cb.state())
                else:
                    self.state.stateful_callbacks[name] = cb.state()
            layout = {"world_size": self.args.world_size, "tensor_parallel_size": self.tp.size,
                      "data_parallel_size": self.dp_size, "sequence_parallel": self.args.sequence_parallel}  # fmt: skip
            (staging / LAYOUT_NAME).write_text(json.dumps(layout, indent=1) + "\n")
            self.state.save_to_json(str(staging / TRAINER_STATE_NAME))
        self._barrier()  # every rank's files are in place
        if self.args.should_save:
            if final.exists():  # the same step saved again: swap, then drop the old one
                old = run_dir / f".{final.name}.old"
                shutil.rmtree(old, ignore_errors=True)
                final.rename(old)
                staging.rename(final)
                shutil.rmtree(old)
            else:
                staging.rename(final)
            rotate_checkpoints(output_dir=str(run_dir), save_total_limit=self.args.save_total_limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True)  # fmt: skip
        self._barrier()

    # -- resuming ---------------------------------------------------------------------------------------------

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None) -> None:
        from ..checkpoint import consolidate

        checkpoint = Path(resume_from_checkpoint)
        if not isinstance(self.model, PeftModel):
            raise ConfigError(f"resume_from_checkpoint={checkpoint}: resuming is supported for adapter training "
                              "(a PeftModel); this model has no adapter")  # fmt: skip
        if not (checkpoint / ADAPTER_SUBDIR).is_dir():
            raise ConfigError(f"resume_from_checkpoint={checkpoint}: no {ADAPTER_SUBDIR}/ directory; expected a "
                              "checkpoint written by optimum_neuron_peft.training.Trainer")  # fmt: skip
        staging = self._broadcast(self._staging_dir(Path(self.args.output_dir), ".resume-adapter-"))
        if self.args.should_save:
            consolidate(checkpoint / ADAPTER_SUBDIR, staging, overwrite=True)
        self._barrier()
        _, tensors = read_vanilla_adapter(staging)
        load_original_adapter_weights(self.model, tensors, "default")  # bit-exact re-slicing for this layout
        self._barrier()
        if self.args.should_save:
            shutil.rmtree(staging)

    def _load_best_model(self) -> None:
        self._load_from_checkpoint(self.state.best_model_checkpoint)

    def _load_optimizer_and_scheduler(self, checkpoint) -> None:
        if checkpoint is None:
            return
        checkpoint = Path(checkpoint)
        if not (checkpoint / OPTIMIZER_WEIGHTS).is_file():  # save_only_model: as transformers, start afresh
            warnings.warn(f"{checkpoint}: no optimizer state ({OPTIMIZER_WEIGHTS}); the optimizer and scheduler start "
                          "afresh", stacklevel=2)  # fmt: skip
            return
        if isinstance(self.model, PeftModel):
            load_optimizer_state(checkpoint, self.model, self.optimizer)
        if (checkpoint / SCHEDULER_NAME).is_file() and self.lr_scheduler is not None:
            self.lr_scheduler.load_state_dict(torch.load(checkpoint / SCHEDULER_NAME, weights_only=True))

    def _load_rng_state(self, checkpoint) -> None:
        if checkpoint is None:
            return
        checkpoint = Path(checkpoint)
        layout_file = checkpoint / LAYOUT_NAME
        same_world = layout_file.is_file() and json.loads(layout_file.read_text())["world_size"] == self.args.world_size
        # Another layout: every rank takes rank 0's state (what depends on it, dropout masks on sharded
        # activations, cannot match across layouts anyway).
        rank = self.args.process_index if same_world else 0
        path = checkpoint / f"rng_state_{rank}.pth"
        if path.is_file():
            _set_rng_state(torch.load(path, weights_only=True))


def _is_sharded(optimizer: torch.optim.Optimizer) -> bool:
    from torch.distributed.optim import ZeroRedundancyOptimizer

    return isinstance(optimizer, ZeroRedundancyOptimizer)


def _rng_state() -> dict[str, Any]:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": random.getstate(), "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss,
            cached), "cpu": torch.get_rng_state()}  # fmt: skip


def _set_rng_state(state: dict[str, Any]) -> None:
    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["cpu"])
