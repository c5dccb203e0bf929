"""The decoder stack and causal-LM head shared by every supported architecture.

`ParallelForCausalLM` holds what the four families have in common; a family (`llama`, `mistral`, `qwen3`,
`granite`) is a subclass naming its model type; what the family changes is in `parallel_plan.FAMILIES`.
Parameter names are Transformers' names (``model.embed_tokens.weight``, ``model.layers.0.input_layernorm.weight``,
``lm_head.weight``...), except inside the spec-covered modules (``self_attn.qkv_proj.weight_q``,
``mlp.gate_up_proj.weight``), named like optimum-neuron's custom models.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.utils.checkpoint
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from ..errors import ConfigError
from ..parallel import (
    TensorParallel,
    allreduce_sequence_parallel_gradients,
    get_data_parallel_rank,
    gather_from_tensor_parallel_region,
    parallel_cross_entropy,
)
from ..transformations import create_parameter_metadata, specialize_transformation_specs_for_model
from ..utils.sharded_writer import sharded_writer
from ..transformations.metadata import model_transformation_specs
from ..transformations.parallel_plan import FAMILIES, original_shapes
from .config import ArchitectureConfig, architecture_config
from .modules import DecoderLayer, RMSNorm, RotaryEmbedding, attention_masks, effective_window
from .plan import ParallelPlan

IGNORE_INDEX = -100


class ParallelDecoderModel(nn.Module):
    """Embedding, decoder layers and final norm (Transformers' ``<Family>Model``, registered as ``model``)."""

    def __init__(self, hf_config: Any, config: ArchitectureConfig, plan: ParallelPlan) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = plan.embedding(config)
        self.layers = nn.ModuleList(DecoderLayer(config, plan, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=plan.dtype, device=plan.device,
                            sequence_parallel=plan.sequence_parallel, tp=plan.tp)  # fmt: skip
        self.rotary_emb = RotaryEmbedding(hf_config, config)
        self.gradient_checkpointing = False
        self._checkpoint_every_n_layers = 1
        self._gradient_checkpointing_func = None

    def set_activation_checkpointing(self, enable: bool, checkpoint_kwargs: dict[str, Any] | None = None,
                                     every_n_layers: int = 1) -> None:  # fmt: skip
        """Recompute each decoder layer in backward instead of keeping its activations (see
        `ParallelForCausalLM.gradient_checkpointing_enable`)."""
        if not isinstance(every_n_layers, int) or every_n_layers < 1:
            raise ConfigError(f"every_n_layers must be an int >= 1, got {every_n_layers!r}")
        kwargs = {"use_reentrant": False, "preserve_rng_state": True, **(checkpoint_kwargs or {})}
        self.gradient_checkpointing = bool(enable)
        self._checkpoint_every_n_layers = every_n_layers
        self._gradient_checkpointing_func = functools.partial(torch.utils.checkpoint.checkpoint, **kwargs) if enable else None

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """Hidden states after the final norm: (B, S, D), or (B, S/tp, D) under sequence parallelism."""
        seq = input_ids.shape[1]
        h = self.embed_tokens(input_ids)
        if self.config.embedding_multiplier != 1.0:
            h = h * self.config.embedding_multiplier
        cos, sin = self.rotary_emb(seq, h.dtype, h.device)
        windows = {effective_window(w, seq) for w in self.config.sliding_windows}
        masks = attention_masks(attention_mask, seq, windows, h.device)
        checkpointing = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for index, layer in enumerate(self.layers):
            if checkpointing and index % self._checkpoint_every_n_layers == 0:
                # The layer's collectives (sequence all-gathers, tensor-parallel reductions) run again in the
                # recomputation, in the same order on every rank; the RNG state is replayed for dropout.
                h = self._gradient_checkpointing_func(layer, h, cos, sin, masks)
            else:
                h = layer(h, cos, sin, masks)
        return self.norm(h)


class ParallelForCausalLM(nn.Module):
    """A tensor-parallel causal LM loading Transformers checkpoints; see `AutoModelForCausalLM.from_pretrained`.

    Subclasses set ``model_type`` (a key of `parallel_plan.FAMILIES`) and ``architectures``.
    """

    model_type: ClassVar[str] = ""
    architectures: ClassVar[tuple[str, ...]] = ()
    # What transformers.Trainer reads to normalise the loss like for its own causal LMs: it passes
    # ``num_items_in_batch`` (the label-token count of the whole accumulated batch) and counts labels[..., 1:].
    accepts_loss_kwargs: ClassVar[bool] = True
    loss_type: ClassVar[str] = "ForCausalLM"

    def __init__(self, hf_config: Any, plan: ParallelPlan | None = None) -> None:
        super().__init__()
        plan = plan or ParallelPlan(TensorParallel.from_state())
        self.config = hf_config  # the Transformers config
        self.arch = arch = self.architecture_config(hf_config)
        plan.check(arch)
        self.plan = plan
        self.tp = plan.tp
        self.model = ParallelDecoderModel(hf_config, arch, plan)
        self.lm_head = plan.lm_head(arch)
        if arch.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight  # both vocab-sharded along dim 0: same slices
        specialize_transformation_specs_for_model(self)

    @classmethod
    def architecture_config(cls, hf_config: Any) -> ArchitectureConfig:
        """The fields of ``hf_config``, read with the switches of this family (`parallel_plan.FAMILIES`)."""
        family = FAMILIES[cls.model_type]
        return architecture_config(hf_config, qk_norm=family.qk_norm, granite=family.granite,
                                   per_layer_sliding=family.per_layer_sliding)  # fmt: skip

    # -- forward ----------------------------------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        return_logits: bool = True,
        return_local_logits: bool = False,
        num_items_in_batch: int | torch.Tensor | None = None,
    ) -> CausalLMOutputWithPast:
        """Causal-LM forward; ``loss`` is Transformers' (shifted labels, -100 ignored, mean), equal on every rank.

        With ``num_items_in_batch`` (given by transformers.Trainer under gradient accumulation) the loss is the sum
        over this batch's label tokens divided by it, as Transformers' ``ForCausalLMLoss`` does.

        ``logits`` are the full-vocabulary logits (B, S, V), all-gathered over the tensor-parallel group; with
        ``return_local_logits`` they are this rank's vocab slice (B, S, V/tp) and nothing is gathered; with
        ``return_logits=False`` they are None (training: the loss never needs the gathered logits).
        """
        self._check_inputs(input_ids, attention_mask, labels)
        hidden = self.model(input_ids, attention_mask)
        local_logits = self.lm_head(hidden)  # (B, S, V/tp): the column-parallel head gathers the sequence shards
        if self.arch.logits_scaling != 1.0:
            local_logits = local_logits / self.arch.logits_scaling
        loss = None if labels is None else self.loss(local_logits, labels, num_items_in_batch)
        logits = None
        if return_logits:
            logits = local_logits if return_local_logits else gather_from_tensor_parallel_region(local_logits, self.tp)
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    def loss(
        self, local_logits: torch.Tensor, labels: torch.Tensor, num_items_in_batch: int | torch.Tensor | None = None
    ) -> torch.Tensor:
        """Mean cross entropy of next-token prediction over the tokens whose shifted label is not -100 (or their
        sum divided by ``num_items_in_batch`` when given)."""
        shifted = torch.nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
        per_token = parallel_cross_entropy(local_logits, shifted, ignore_index=IGNORE_INDEX, tp=self.tp)
        if num_items_in_batch is not None:
            if torch.is_tensor(num_items_in_batch):
                num_items_in_batch = num_items_in_batch.to(per_token.device)
            return per_token.sum() / num_items_in_batch
        return per_token.sum() / (shifted != IGNORE_INDEX).sum()

    def _check_inputs(self, input_ids, attention_mask, labels) -> None:
        if input_ids.dim() != 2:
            raise ConfigError(f"input_ids must be (batch, sequence), got shape {tuple(input_ids.shape)}")
        for name, value in (("attention_mask", attention_mask), ("labels", labels)):
            if value is not None and value.shape != input_ids.shape:
                raise ConfigError(f"{name} must have the shape of input_ids {tuple(input_ids.shape)}, got {tuple(value.shape)}")
        if self.plan.sequence_parallel and input_ids.shape[1] % self.tp.size != 0:
            raise ConfigError(
                f"sequence parallelism needs a sequence length divisible by the tensor-parallel size {self.tp.size}, "
                f"got {input_ids.shape[1]}; pad the batch to a multiple of {self.tp.size}"
            )

    # -- activation checkpointing (Transformers' API) ---------------------------------------------------------

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict[str, Any] | None = None) -> None:
        """Activation checkpointing per decoder layer, like Transformers' ``gradient_checkpointing_enable``.

        ``gradient_checkpointing_kwargs`` go to `torch.utils.checkpoint.checkpoint`; the defaults are
        ``use_reentrant=False`` (Transformers' default: works with frozen inputs and keyword arguments) and
        ``preserve_rng_state=True`` (dropout draws the same masks in the recomputation). Only in training mode.
        """
        self.model.set_activation_checkpointing(True, gradient_checkpointing_kwargs)

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict[str, Any] | None = None,
                                        every_n_layers: int = 1) -> None:  # fmt: skip
        """Transformers 5's name of `gradient_checkpointing_enable`; ``every_n_layers`` checkpoints layers 0, n, 2n..."""
        self.model.set_activation_checkpointing(True, activation_checkpointing_kwargs, every_n_layers)

    def gradient_checkpointing_disable(self) -> None:
        self.model.set_activation_checkpointing(False)

    activation_checkpointing_disable = gradient_checkpointing_disable

    @property
    def is_gradient_checkpointing(self) -> bool:
        """Whether activation checkpointing is on (PEFT and the Transformers Trainer read this name)."""
        return self.model.gradient_checkpointing

    is_activation_checkpointing = is_gradient_checkpointing

    def allreduce_sequence_parallel_gradients(self) -> None:
        """Kept for existing training loops: a no-op now.

        Under sequence parallelism the norm weights and row-parallel biases get their gradients summed over the
        tensor-parallel group during backward (`reduce_gradient_in_backward`), so nothing is left to do and calling
        this (once, twice, or not at all) never reduces twice. Parameters marked by hand with
        `mark_sequence_parallel` (without ``reduced_in_backward``) are still completed here.
        """
        if self.plan.sequence_parallel:
            allreduce_sequence_parallel_gradients(self, self.tp)

    # -- weights ----------------------------------------------------------------------------------------------

    def original_parameter_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor expected in the Transformers checkpoint, with its full shape (from the parallel plan)."""
        return original_shapes(self.arch)

    def transformation_specs(self) -> list:
        """The `ModelWeightTransformationSpecs` of every custom module (for `to_original_weights`)."""
        return model_transformation_specs(self)

    def parameters_metadata(self) -> dict[str, Any]:
        """Tensor-parallel metadata of the parameters and specs (docs/checkpoint_formats.md section 3)."""
        return create_parameter_metadata(self)

    def sharded_state_dict(self) -> dict[str, torch.Tensor]:
        """This rank's parameters by name (tied weights once, under ``model.embed_tokens.weight``)."""
        return {name: param.detach() for name, param in self.named_parameters()}

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> Path:
        """Write this model in the project's sharded checkpoint format (`optimum_neuron_peft.checkpoint.save`).

        Collective over the tensor-parallel group when tp > 1: every tp rank of data-parallel replica 0 must call
        it (other replicas return without writing). ``kwargs`` go to the checkpoint writer (``overwrite``,
        ``extra_files``).
        """
        writer = sharded_writer()
        metadata = self.parameters_metadata()
        config = self.config.to_dict()
        if not self.tp.is_parallel:
            return writer.save_sharded_checkpoint(save_directory, {(0, 0): self.sharded_state_dict()}, {0: metadata},
                                           config=config, **kwargs)  # fmt: skip
        if get_data_parallel_rank() != 0:
            return Path(save_directory)
        return writer.save_sharded_checkpoint_distributed(
            save_directory, self.sharded_state_dict(), metadata, tp_rank=self.tp.rank, tp_size=self.tp.size,
            group=self.tp.group, config=config, **kwargs,
        )  # fmt: skip
