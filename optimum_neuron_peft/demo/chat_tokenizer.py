"""A tiny word-level chat tokenizer built locally from a corpus (no download), for examples and tests.

One token per word or punctuation mark (``tokenizers`` WordLevel, split on whitespace and punctuation) plus the
special tokens below, wrapped in ``transformers.PreTrainedTokenizerFast`` with a chat template. The template marks
assistant turns with ``{% generation %}``, so ``apply_chat_template(..., return_assistant_tokens_mask=True)`` and
therefore TRL's / our ``assistant_only_loss`` work. Ids 0 and 1 are ``<s>`` and ``<|end|>``, the bos/eos ids of
`optimum_neuron_peft.demo.tiny_model.build_tiny_llama`, so generation stops at the end of the assistant's turn.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

SPECIAL_TOKENS = ("<s>", "<|end|>", "<pad>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>")
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "<|assistant|> {% generation %}{{ message['content'] }} <|end|>{% endgeneration %} "
    "{%- else -%}"
    "<|{{ message['role'] }}|> {{ message['content'] }} <|end|> "
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|assistant|>{%- endif -%}"
)


def build_chat_tokenizer(texts: Iterable[str], output_dir: str | Path | None = None):
    """A ``PreTrainedTokenizerFast`` whose vocabulary is the special tokens then every word of ``texts``, sorted.

    The vocabulary depends only on the set of words, so the same corpus always gives the same ids. With
    ``output_dir`` the tokenizer is also saved there (``tokenizer.json`` + config, loadable by ``AutoTokenizer``).
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    splitter = pre_tokenizers.Whitespace()  # \w+ | [^\w\s]+
    words = sorted({w for text in texts for w, _ in splitter.pre_tokenize_str(text)} - set(SPECIAL_TOKENS))
    vocab = {tok: i for i, tok in enumerate([*SPECIAL_TOKENS, *words])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = splitter
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="<|end|>", pad_token="<pad>", unk_token="<unk>",
        additional_special_tokens=list(SPECIAL_TOKENS[4:]), chat_template=CHAT_TEMPLATE,
    )  # fmt: skip
    if output_dir is not None:
        tokenizer.save_pretrained(output_dir)
    return tokenizer


def message_texts(conversations: Iterable[dict]) -> list[str]:
    """The message contents of TRL-style conversations ({"messages": [{"role", "content"}...]})."""
    return [m["content"] for conv in conversations for m in conv["messages"]]
