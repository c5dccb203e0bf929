"""SFT dataset preparation as TRL's ``SFTTrainer`` does it, with fixed batch shapes for Neuron.

Rows come out as TRL 1.16's ``SFTTrainer._prepare_dataset`` makes them (``input_ids`` and ``labels`` with -100 on the
tokens that carry no loss), built from TRL's own public pieces (``is_conversational``, ``maybe_convert_to_chatml``,
``pack_dataset``) and the tokenizer's ``apply_chat_template``; ``tests/training/test_sft_data.py`` compares them
with what TRL's ``SFTTrainer`` itself prepares. What differs is the batching: Neuron compiles one graph per input
shape, so `FixedShapeCollator` pads every batch to exactly (batch, max_length) (TRL's collator pads to the longest
row), and padding-free packing is not offered (our models take no per-document position ids): ``wrapped`` packing,
the default here, fills every row to ``max_length`` except the last, which is padded.

Dataset formats (TRL's): ``messages`` (chat template; ``conversations`` with from/value is converted), ``prompt`` /
``completion`` (plain text or conversational), or a text column (``dataset_text_field``). Inputs: a
``datasets.Dataset`` or ``IterableDataset``, or a local ``.json`` / ``.jsonl`` / ``.parquet`` file.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

IGNORE_INDEX = -100
PACKING_STRATEGIES = ("wrapped", "bfd", "bfd_split")
_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def load_sft_dataset(source: Any, name: str = "train_dataset"):
    """A ``datasets.Dataset`` from a Dataset (returned as is) or a local json / jsonl / parquet file path."""
    import datasets

    if isinstance(source, (datasets.Dataset, datasets.IterableDataset)):
        return source
    if isinstance(source, datasets.DatasetDict):
        raise TypeError(f"{name}: expected a datasets.Dataset or a file path, found a DatasetDict with splits "
                        f"{sorted(source)}; pass one split, e.g. dataset['train']")  # fmt: skip
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"{name}: expected a datasets.Dataset or a .json/.jsonl/.parquet path, found "
                        f"{type(source).__name__}")  # fmt: skip
    path = Path(source)
    builder = _FILE_BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise ValueError(f"{name}: {path}: expected a .json, .jsonl or .parquet file, found suffix {path.suffix!r}")
    if not path.is_file():
        raise ValueError(f"{name}: {path}: no such file")
    return datasets.load_dataset(builder, data_files=str(path), split="train")


def _column_names(dataset) -> list[str]:
    return list(next(iter(dataset)).keys()) if dataset.column_names is None else list(dataset.column_names)


def _map_kwargs(dataset, num_proc: int | None, desc: str) -> dict[str, Any]:
    import datasets

    # IterableDataset.map takes neither num_proc nor desc
    return {"num_proc": num_proc, "desc": desc} if isinstance(dataset, datasets.Dataset) else {}


def _tokenize_example(example: dict, tokenizer, dataset_text_field: str, assistant_only_loss: bool,
                      chat_template: str | None) -> dict[str, list]:  # fmt: skip
    """TRL's tokenize step: ``input_ids`` plus ``completion_mask`` (prompt-completion) or ``assistant_masks``."""
    from trl import is_conversational
    from trl.data_utils import common_prefix_length

    def chat(messages, **kwargs):
        tools = example.get("tools")
        tools = json.loads(tools) if isinstance(tools, str) else tools
        return tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, chat_template=chat_template,
                                             tools=tools, **example.get("chat_template_kwargs", {}), **kwargs)  # fmt: skip

    conversational = is_conversational(example)
    if "prompt" in example:
        out: dict[str, list] = {}
        if conversational:
            prompt_ids = chat(example["prompt"], add_generation_prompt=True)["input_ids"]
            full = chat(example["prompt"] + example["completion"], return_assistant_tokens_mask=assistant_only_loss)
            if "assistant_masks" in full:
                out["assistant_masks"] = list(full["assistant_masks"])
            ids = list(full["input_ids"])
        else:
            prompt_ids = tokenizer(text=example["prompt"])["input_ids"]
            ids = list(tokenizer(text=example["prompt"] + example["completion"])["input_ids"])
        # The completion starts where the tokenized prompt and prompt+completion diverge (TRL's rule)
        prompt_len = common_prefix_length(list(prompt_ids), ids)
        out["input_ids"] = ids
        out["completion_mask"] = [0] * prompt_len + [1] * (len(ids) - prompt_len)
    elif conversational:
        full = chat(example["messages"], return_assistant_tokens_mask=assistant_only_loss)
        out = {"input_ids": list(full["input_ids"])}
        if "assistant_masks" in full:
            out["assistant_masks"] = list(full["assistant_masks"])
    else:
        out = {"input_ids": list(tokenizer(text=example[dataset_text_field])["input_ids"])}
    if "assistant_masks" in out and 1 not in out["assistant_masks"]:
        raise ValueError("assistant_only_loss=True: an example has no assistant tokens; the tokenizer's chat template "
                         "must mark assistant turns with {% generation %} ... {% endgeneration %}")  # fmt: skip
    return out


def _labels(example: dict, mask_columns: list[str]) -> dict[str, list[int]]:
    masks = [example[c] for c in mask_columns]
    return {"labels": [t if all(bits) else IGNORE_INDEX for t, *bits in zip(example["input_ids"], *masks)]}


def prepare_sft_dataset(
    dataset: Any,
    tokenizer,
    *,
    max_length: int | None,
    packing: bool = False,
    packing_strategy: str = "wrapped",
    completion_only_loss: bool | None = None,
    assistant_only_loss: bool = False,
    dataset_text_field: str = "text",
    formatting_func: Callable[[dict], str] | None = None,
    eos_token: str | None = None,
    chat_template: str | None = None,
    shuffle_dataset: bool = False,
    seed: int = 42,
    num_proc: int | None = None,
    name: str = "train_dataset",
):
    """Tokenized ``input_ids`` / ``labels`` rows of at most ``max_length`` tokens, as TRL's ``SFTTrainer`` prepares them.

    ``completion_only_loss=None`` means: on for prompt-completion data, off otherwise (TRL's rule). Prompt tokens
    (``completion_only_loss``) and non-assistant tokens (``assistant_only_loss``) get the label -100. A dataset that
    already has ``input_ids`` is taken as tokenized (its ``labels`` kept, or built from ``input_ids``).
    """
    from trl import is_conversational, is_conversational_from_value, maybe_convert_to_chatml, pack_dataset

    dataset = load_sft_dataset(dataset, name)
    if packing and packing_strategy not in PACKING_STRATEGIES:
        raise ValueError(f"packing_strategy: expected one of {PACKING_STRATEGIES}, found {packing_strategy!r}")
    if (packing or max_length is not None) and not (isinstance(max_length, int) and max_length > 0):
        raise ValueError(f"max_length: expected a positive int{' (packing needs it)' if packing else ''}, "
                         f"found {max_length!r}")  # fmt: skip
    columns = _column_names(dataset)
    prompt_completion = "prompt" in columns and "completion" in columns  # TRL decides on the raw columns
    if "input_ids" not in columns:
        if formatting_func is not None:
            dataset = dataset.map(lambda ex: {"text": formatting_func(ex)}, **_map_kwargs(dataset, num_proc, "Formatting"))
            dataset_text_field = "text"
        first = next(iter(dataset))
        if is_conversational_from_value(first):
            remove = "conversations" if "conversations" in columns else None
            dataset = dataset.map(maybe_convert_to_chatml, remove_columns=remove,
                                  **_map_kwargs(dataset, num_proc, "Converting to ChatML"))  # fmt: skip
            first = next(iter(dataset))
        columns = _column_names(dataset)
        known = {"messages", "prompt", "completion", dataset_text_field}
        if not known & set(columns) or ("prompt" in columns) != ("completion" in columns):
            raise ValueError(f"{name}: expected a 'messages' column, 'prompt' and 'completion' columns, or a "
                             f"'{dataset_text_field}' column (dataset_text_field), found columns {columns}")  # fmt: skip
        if assistant_only_loss and not is_conversational(first):
            raise ValueError(f"assistant_only_loss=True needs a conversational dataset ('messages' of role/content "
                             f"dicts), found columns {columns} in {name}")  # fmt: skip
        if not is_conversational(first):
            # TRL's rule: text and completions end with the EOS token, which a chat template writes itself otherwise
            eos = eos_token or tokenizer.eos_token
            if eos is None:
                raise ValueError("eos_token: the tokenizer has no eos_token; set SFTConfig.eos_token")

            def add_eos(example):
                if dataset_text_field in example and not example[dataset_text_field].endswith(eos):
                    example[dataset_text_field] = example[dataset_text_field] + eos
                elif "completion" in example and not example["completion"].endswith(eos):
                    example["completion"] = example["completion"] + eos
                return example

            dataset = dataset.map(add_eos, remove_columns="messages" if "messages" in columns else None,
                                  **_map_kwargs(dataset, num_proc, "Adding EOS"))  # fmt: skip
        dataset = dataset.map(_tokenize_example, fn_kwargs={
            "tokenizer": tokenizer, "dataset_text_field": dataset_text_field,
            "assistant_only_loss": assistant_only_loss, "chat_template": chat_template,
        }, **_map_kwargs(dataset, num_proc, f"Tokenizing {name}"))  # fmt: skip
    columns = _column_names(dataset)
    if completion_only_loss is None:
        completion_only_loss = prompt_completion
    if "labels" not in columns:
        masks = [c for c in ("completion_mask",) if completion_only_loss and c in columns]
        masks += [c for c in ("assistant_masks",) if c in columns]
        dataset = dataset.map(_labels, fn_kwargs={"mask_columns": masks}, remove_columns=masks,
                              **_map_kwargs(dataset, num_proc, "Building labels"))  # fmt: skip
    if max_length is not None and not packing:
        dataset = dataset.map(lambda ex: {"input_ids": ex["input_ids"][:max_length], "labels": ex["labels"][:max_length]},
                              **_map_kwargs(dataset, num_proc, "Truncating"))  # fmt: skip
        # as TRL: a row left with no label (a prompt filling max_length) carries no loss
        dataset = dataset.filter(lambda ex: any(t != IGNORE_INDEX for t in ex["labels"]),
                                 **_map_kwargs(dataset, num_proc, "Dropping fully masked rows"))  # fmt: skip
    dataset = dataset.select_columns(["input_ids", "labels"])
    if packing:
        if shuffle_dataset:  # before packing too, as TRL does, so that neighbours in a row are unrelated
            dataset = dataset.shuffle(seed=seed)
        dataset = pack_dataset(dataset, max_length, packing_strategy, _map_kwargs(dataset, num_proc, "Packing"))
        dataset = dataset.select_columns(["input_ids", "labels"])  # bfd's seq_lengths serve padding-free only
    if shuffle_dataset:
        dataset = dataset.shuffle(seed=seed)
    return dataset


@dataclass
class FixedShapeCollator:
    """Batches of exactly (batch_size, max_length): ``input_ids``, ``attention_mask``, ``labels``.

    Rows are right-padded to ``max_length`` with TRL's ``DataCollatorForLanguageModeling`` (pad token, attention 0,
    label -100). With ``batch_size`` set, a short final batch is completed with filler rows (pad tokens, every label
    -100, attention 1 so that no softmax row is empty): they add no term to a token-averaged loss and no gradient, and
    the compiled graph stays the same.
    """

    pad_token_id: int
    max_length: int
    batch_size: int | None = None

    def __post_init__(self) -> None:
        from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

        if not isinstance(self.max_length, int) or self.max_length < 1:
            raise ValueError(f"FixedShapeCollator.max_length: expected a positive int, found {self.max_length!r}")
        # Rows are at most max_length long, so padding "to a multiple of max_length" pads to exactly max_length.
        self._pad = DataCollatorForLanguageModeling(pad_token_id=self.pad_token_id, pad_to_multiple_of=self.max_length)

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        longest = max(len(ex["input_ids"]) for ex in examples)
        if longest > self.max_length:
            raise ValueError(f"FixedShapeCollator: a row has {longest} tokens, more than max_length={self.max_length}; "
                             "prepare the dataset with prepare_sft_dataset (it truncates or packs)")  # fmt: skip
        if self.batch_size is not None and len(examples) > self.batch_size:
            raise ValueError(f"FixedShapeCollator: {len(examples)} rows, more than batch_size={self.batch_size}")
        rows = [{"input_ids": ex["input_ids"], "labels": ex.get("labels", ex["input_ids"])} for ex in examples]
        batch = self._pad(rows)
        missing = 0 if self.batch_size is None else self.batch_size - len(examples)
        if missing:
            shape = (missing, self.max_length)
            filler = {"input_ids": torch.full(shape, self.pad_token_id, dtype=batch["input_ids"].dtype),
                      "attention_mask": torch.ones(shape, dtype=batch["attention_mask"].dtype),
                      "labels": torch.full(shape, IGNORE_INDEX, dtype=batch["labels"].dtype)}  # fmt: skip
            batch = {k: torch.cat([batch[k], filler[k]]) for k in ("input_ids", "attention_mask", "labels")}
        return {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
