"""SFT data preparation: rows equal to what TRL's own SFTTrainer prepares, fixed (batch, max_length) batches, and
label -100 exactly on the tokens that carry no loss (checked from the token stream itself, not from our masks)."""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import datasets
import pytest
import torch
from torch.utils.data import DataLoader
from transformers import LlamaConfig, LlamaForCausalLM

from optimum_neuron_peft.demo.chat_tokenizer import build_chat_tokenizer, message_texts
from optimum_neuron_peft.training.sft_data import IGNORE_INDEX, FixedShapeCollator, prepare_sft_dataset

REPO = Path(__file__).resolve().parents[2]
CHAT = REPO / "examples" / "data" / "chat.jsonl"
CONVERSATIONS = [json.loads(line) for line in CHAT.read_text(encoding="utf-8").splitlines()]
SUBSET = CONVERSATIONS[:48]


@pytest.fixture(scope="module")
def tokenizer():
    return build_chat_tokenizer(message_texts(CONVERSATIONS))


def _datasets(tokenizer) -> dict[str, datasets.Dataset]:
    """The same conversations in each of TRL's formats."""
    msgs = [c["messages"] for c in SUBSET]
    return {
        "messages": datasets.Dataset.from_list(SUBSET),
        "prompt_completion_chat": datasets.Dataset.from_list([{"prompt": m[:-1], "completion": m[-1:]} for m in msgs]),
        "prompt_completion_text": datasets.Dataset.from_list(
            [{"prompt": m[-2]["content"], "completion": " " + m[-1]["content"]} for m in msgs]),
        "text": datasets.Dataset.from_list([{"text": tokenizer.apply_chat_template(m, tokenize=False)} for m in msgs]),
    }  # fmt: skip


def _trl_prepared(dataset, tokenizer, formatting_func=None, **kwargs) -> datasets.Dataset:
    """What TRL 1.16's SFTTrainer itself makes of the dataset (its train_dataset after __init__)."""
    from trl import SFTConfig, SFTTrainer

    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))  # fmt: skip
    with tempfile.TemporaryDirectory() as out:
        args = SFTConfig(output_dir=out, report_to=[], bf16=False, gradient_checkpointing=False, **kwargs)
        return SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                          formatting_func=formatting_func).train_dataset


TRL_CASES = [
    ("messages", dict(max_length=24)),  # truncation, and rows dropped when nothing is left to learn
    ("messages", dict(max_length=32, assistant_only_loss=True)),
    ("messages", dict(max_length=32, packing=True, packing_strategy="wrapped", assistant_only_loss=True)),
    ("messages", dict(max_length=40, packing=True, packing_strategy="bfd")),
    ("messages", dict(max_length=20, packing=True, packing_strategy="bfd_split", assistant_only_loss=True)),
    ("prompt_completion_chat", dict(max_length=48)),  # completion_only_loss by default
    ("prompt_completion_chat", dict(max_length=48, completion_only_loss=False)),
    ("prompt_completion_text", dict(max_length=32, packing=True, packing_strategy="wrapped")),
    ("text", dict(max_length=32, packing=True, packing_strategy="wrapped")),
]


@pytest.mark.parametrize("fmt,kwargs", TRL_CASES, ids=[f"{f}-{i}" for i, (f, _) in enumerate(TRL_CASES)])
def test_rows_equal_trl_sft_trainer(tokenizer, fmt, kwargs):
    dataset = _datasets(tokenizer)[fmt]
    ref = _trl_prepared(dataset, tokenizer, **kwargs)
    ours = prepare_sft_dataset(dataset, tokenizer, **kwargs)
    assert ours.column_names == ["input_ids", "labels"]
    assert ours["input_ids"] == ref["input_ids"] and ours["labels"] == ref["labels"]
    assert any(IGNORE_INDEX in row for row in ours["labels"]) == bool(
        kwargs.get("assistant_only_loss") or (fmt.startswith("prompt") and kwargs.get("completion_only_loss", True)))


def test_formatting_func_equals_trl(tokenizer):
    dataset = datasets.Dataset.from_list([{"question": c["messages"][-2]["content"],
                                           "answer": c["messages"][-1]["content"]} for c in SUBSET])  # fmt: skip

    def fmt(example):
        return f"Q : {example['question']} A : {example['answer']}"

    ref = _trl_prepared(dataset, tokenizer, formatting_func=fmt, max_length=16)
    ours = prepare_sft_dataset(dataset, tokenizer, formatting_func=fmt, max_length=16)
    assert ours["input_ids"] == ref["input_ids"] and ours["labels"] == ref["labels"]
    assert all(row[-1] == tokenizer.eos_token_id for row in ours["input_ids"] if len(row) < 16)


def _chat_ids(tokenizer, messages, **kwargs) -> list[int]:
    return list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kwargs)["input_ids"])


def _assistant_labels(ids: list[int], tokenizer) -> list[int]:
    """Labels from the token stream: a token is learnt iff it is inside an assistant turn (after <|assistant|>, up
    to and including its <|end|>)."""
    start, end = tokenizer.convert_tokens_to_ids(["<|assistant|>", "<|end|>"])
    labels, inside = [], False
    for t in ids:
        labels.append(t if inside else IGNORE_INDEX)
        inside = (inside and t != end) or t == start
    return labels


def test_packed_batches_have_fixed_shape_and_prompt_labels(tokenizer):
    max_length, batch = 32, 4
    packed = prepare_sft_dataset(datasets.Dataset.from_list(SUBSET), tokenizer, max_length=max_length, packing=True,
                                 assistant_only_loss=True)  # fmt: skip
    stream = [t for row in packed["input_ids"] for t in row]
    assert stream == [t for c in SUBSET for t in _chat_ids(tokenizer, c["messages"])]
    assert [t for row in packed["labels"] for t in row] == _assistant_labels(stream, tokenizer)
    assert len(packed) % batch != 0 and len(packed["input_ids"][-1]) < max_length  # a short last row and batch

    collator = FixedShapeCollator(tokenizer.pad_token_id, max_length, batch_size=batch)
    batches = list(DataLoader(packed, batch_size=batch, collate_fn=collator))
    assert {tuple(b[k].shape) for b in batches for k in b} == {(batch, max_length)}
    rows = [(b["input_ids"][i], b["attention_mask"][i], b["labels"][i]) for b in batches for i in range(batch)]
    for (ids, mask, labels), source in zip(rows, packed):
        n = len(source["input_ids"])
        assert ids[:n].tolist() == source["input_ids"] and labels[:n].tolist() == source["labels"]
        assert mask.tolist() == [1] * n + [0] * (max_length - n)
        assert (ids[n:] == tokenizer.pad_token_id).all() and (labels[n:] == IGNORE_INDEX).all()
    for ids, mask, labels in rows[len(packed):]:  # filler rows: no loss, nothing masked out entirely
        assert (labels == IGNORE_INDEX).all() and (mask == 1).all() and (ids == tokenizer.pad_token_id).all()


def test_completion_only_labels_cover_exactly_the_completion(tokenizer):
    dataset = _datasets(tokenizer)["prompt_completion_chat"]
    rows = prepare_sft_dataset(dataset, tokenizer, max_length=64)
    for example, ids, labels in zip(dataset, rows["input_ids"], rows["labels"]):
        prompt = _chat_ids(tokenizer, example["prompt"], add_generation_prompt=True)
        assert ids[: len(prompt)] == prompt
        assert labels == [IGNORE_INDEX] * len(prompt) + ids[len(prompt):]


def test_filler_rows_change_neither_loss_nor_gradients(tokenizer):
    """The rows that complete a short batch are inert under a token-averaged loss (Transformers' causal LM loss)."""
    rows = prepare_sft_dataset(datasets.Dataset.from_list(SUBSET[:3]), tokenizer, max_length=24)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))  # fmt: skip

    def loss_and_grads(batch):
        model.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    short = FixedShapeCollator(tokenizer.pad_token_id, 24)(list(rows))
    full = FixedShapeCollator(tokenizer.pad_token_id, 24, batch_size=5)(list(rows))
    assert full["input_ids"].shape == (5, 24) and short["input_ids"].shape == (3, 24)
    (l1, g1), (l2, g2) = loss_and_grads(short), loss_and_grads(full)
    torch.testing.assert_close(l2, l1, rtol=1e-6, atol=0)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-8)


def test_file_inputs_and_errors(tokenizer, tmp_path):
    dataset = datasets.Dataset.from_list(SUBSET)
    dataset.to_json(tmp_path / "chat.jsonl")
    dataset.to_parquet(tmp_path / "chat.parquet")
    expected = prepare_sft_dataset(dataset, tokenizer, max_length=32, packing=True)
    for name in ("chat.jsonl", "chat.parquet"):
        got = prepare_sft_dataset(str(tmp_path / name), tokenizer, max_length=32, packing=True)
        assert got["input_ids"] == expected["input_ids"] and got["labels"] == expected["labels"]
    streamed = list(prepare_sft_dataset(dataset.to_iterable_dataset(), tokenizer, max_length=32, packing=True))
    assert [r["input_ids"] for r in streamed] == expected["input_ids"]
    assert [r["labels"] for r in streamed] == expected["labels"]
    with pytest.raises(ValueError, match=r"train_dataset: .*chat\.csv: expected a \.json, \.jsonl or \.parquet"):
        prepare_sft_dataset(tmp_path / "chat.csv", tokenizer, max_length=32)
    with pytest.raises(ValueError, match="no such file"):
        prepare_sft_dataset(tmp_path / "missing.jsonl", tokenizer, max_length=32)
    with pytest.raises(ValueError, match=r"expected a 'messages' column.*found columns \['question'\]"):
        prepare_sft_dataset(datasets.Dataset.from_list([{"question": "hi"}]), tokenizer, max_length=32)
    with pytest.raises(ValueError, match="packing_strategy"):
        prepare_sft_dataset(dataset, tokenizer, max_length=32, packing=True, packing_strategy="padding_free")
    with pytest.raises(ValueError, match="max_length"):
        prepare_sft_dataset(dataset, tokenizer, max_length=None, packing=True)
    with pytest.raises(ValueError, match="assistant_only_loss=True needs a conversational dataset"):
        prepare_sft_dataset(_datasets(tokenizer)["text"], tokenizer, max_length=32, assistant_only_loss=True)
    plain = build_chat_tokenizer(message_texts(CONVERSATIONS))
    plain.chat_template = plain.chat_template.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    with pytest.raises(ValueError, match=r"assistant_only_loss=True: an example has no assistant tokens.*generation"):
        prepare_sft_dataset(dataset, plain, max_length=32, assistant_only_loss=True)
    with pytest.raises(ValueError, match="more than max_length=8"):
        FixedShapeCollator(tokenizer.pad_token_id, 8)([{"input_ids": list(range(9))}])


def test_shipped_chat_data_is_what_its_script_writes():
    sys.path.insert(0, str(CHAT.parent))
    try:
        import make_chat_data
    finally:
        sys.path.remove(str(CHAT.parent))
    assert make_chat_data.render() == CHAT.read_text(encoding="utf-8")
    assert 200 <= len(CONVERSATIONS) <= 1000
