"""Write examples/data/chat.jsonl: a few hundred short chat conversations in a fixed, small vocabulary.

Deterministic (fixed seed, no network): ``python examples/data/make_chat_data.py`` rewrites the same bytes, which
``tests/training/test_sft_data.py`` checks. Each line is ``{"messages": [{"role": ..., "content": ...}, ...]}``, TRL's
conversational format: arithmetic (plus, minus), counting (after, before), colours of things and animal sounds, some
with a system message, some with two user/assistant turns.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

OUT = Path(__file__).with_name("chat.jsonl")
SYSTEM = "You are a helpful assistant ."
COLORS = {"sky": "blue", "grass": "green", "snow": "white", "sun": "yellow", "coal": "black", "cherry": "red",
          "banana": "yellow", "leaf": "green", "sea": "blue", "milk": "white", "night": "black", "tomato": "red"}
SOUNDS = {"dog": "woof", "cat": "meow", "cow": "moo", "duck": "quack", "sheep": "baa", "owl": "hoot",
          "frog": "ribbit", "lion": "roar", "pig": "oink", "horse": "neigh", "bee": "buzz", "mouse": "squeak"}


def question_answers() -> list[tuple[str, str]]:
    """Every single-turn (question, answer) pair; the content is plain words and punctuation."""
    pairs = [(f"What is {a} plus {b} ?", f"{a} plus {b} is {a + b} .") for a in range(10) for b in range(10)]
    pairs += [(f"What is {a} minus {b} ?", f"{a} minus {b} is {a - b} .") for a in range(10) for b in range(a + 1)]
    pairs += [(f"What comes after {n} ?", f"{n + 1} comes after {n} .") for n in range(20)]
    pairs += [(f"What comes before {n} ?", f"{n - 1} comes before {n} .") for n in range(1, 21)]
    pairs += [(f"What color is the {t} ?", f"The {t} is {c} .") for t, c in COLORS.items()]
    pairs += [(f"What does a {a} say ?", f"A {a} says {s} .") for a, s in SOUNDS.items()]
    pairs += [("Hello !", "Hello ! How can I help ?"), ("Thank you !", "You are welcome .")]
    return pairs


def conversations(seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    pairs = question_answers()
    convs = []
    for i, (q, a) in enumerate(pairs):
        messages = [{"role": "system", "content": SYSTEM}] if i % 5 == 0 else []
        convs.append({"messages": messages + [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
    for _ in range(80):  # two-turn conversations
        (q1, a1), (q2, a2) = rng.sample(pairs, 2)
        convs.append({"messages": [{"role": "user", "content": q1}, {"role": "assistant", "content": a1},
                                   {"role": "user", "content": q2}, {"role": "assistant", "content": a2}]})
    rng.shuffle(convs)
    return convs


def render(seed: int = 0) -> str:
    return "".join(json.dumps(c, sort_keys=True) + "\n" for c in conversations(seed))


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else OUT
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(render(), encoding="utf-8")
    tmp.replace(out)  # atomic
    print(f"wrote {out} ({len(conversations())} conversations)")
