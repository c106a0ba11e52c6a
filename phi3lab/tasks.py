"""Small synthetic tasks that show well-known circuits.

The shipped model `phi3lab_tiny_en` is trained on text from these generators
(see `scripts/train_tiny.py`), and the notebooks and tests probe it with
held-out examples from the same generators:

* repeated random word sequences (induction heads), with varied periods;
* name-mover sentences: "When Mary and John went to the store, John gave a
  drink to" -> " Mary" (indirect object identification);
* short chat turns in Phi-3's format.
"""

from __future__ import annotations

import dataclasses

import numpy as np

TRAIN_NAMES = (
    "Mary John Alice Bob Sarah James Emma David Laura Peter Anna Mark Julia "
    "Paul Kate Tom Lucy Sam Nora Eric Grace Henry Ivy Jack Rose Adam Clara "
    "Leo Mia Oscar Ruth Victor Zoe Hugo Ella Felix Iris Owen Vera Max"
).split()
HELD_OUT_NAMES = "Diana Frank Helen Ben Olivia Carl Sophie Dan Irene Luke".split()
PLACES = "store park school office market station library garden beach cafe".split()
OBJECTS = "drink book ball letter gift key phone ticket flower cake".split()
VERBS = ("gave", "handed", "passed", "sent", "showed")
TEMPLATES = (
    "When {a} and {b} went to the {place}, {b} {verb} a {obj} to",
    "After {a} and {b} arrived at the {place}, {b} {verb} a {obj} to",
    "Then {a} and {b} walked to the {place}, and {b} {verb} the {obj} to",
)
WORDS = (
    "red blue green river stone cloud apple window seven orange paper glass "
    "music light table dream silver north winter coffee bridge horse candle "
    "forest mirror rocket pencil garden ocean thunder valley yellow copper "
    "lemon tiger purple castle desert island planet violin marble spider"
).split()


@dataclasses.dataclass(frozen=True)
class NameMoverPrompt:
    """A prompt whose correct next word is `answer` (the indirect object),
    with `counterfactual` the subject named twice. Both are bare names; their
    token ids come from `name_token(tokenizer, name)`."""

    text: str
    answer: str
    counterfactual: str


def name_mover_prompts(count: int, seed: int = 0, names=HELD_OUT_NAMES) -> list[NameMoverPrompt]:
    """`count` name-mover prompts using `names` (held-out ones by default).

    Example:
    >>> name_mover_prompts(1, names=("Mary", "John"))[0].text[:21]
    'When Mary and John we'
    """
    rng = np.random.default_rng(seed)
    prompts = []
    for _ in range(count):
        a, b = rng.choice(names, 2, replace=False)
        template = TEMPLATES[rng.integers(len(TEMPLATES))]
        text = template.format(
            a=a, b=b, place=rng.choice(PLACES), verb=rng.choice(VERBS), obj=rng.choice(OBJECTS)
        )
        prompts.append(NameMoverPrompt(text, str(a), str(b)))
    return prompts


def name_token(tokenizer, name: str) -> int:
    """The id of `name`'s first token as it appears after a space inside a
    sentence. SentencePiece prefixes a word with "▁" by itself, so encode the
    bare name: `encode(" Mary")` would start with a lone "▁" token."""
    return tokenizer.encode(name.strip())[0]


def repeated_words(period: int, repeats: int = 2, seed: int = 0) -> str:
    """A random sequence of `period` words from `WORDS`, repeated."""
    rng = np.random.default_rng(seed)
    words = list(rng.choice(WORDS, period))
    return " ".join(words * repeats)


def repeated_tokens(vocabulary: int, period: int, batch: int = 1, first_id: int = 1, low: int = 3, seed: int = 0) -> np.ndarray:
    """Token ids `[batch, 1 + 2 * period]`: a first token, then a random
    sequence of `period` ids from `[low, vocabulary)` repeated twice."""
    rng = np.random.default_rng(seed)
    half = rng.integers(low, vocabulary, (batch, period))
    first = np.full((batch, 1), first_id)
    return np.concatenate([first, half, half], axis=1).astype(np.int32)


def chat_turns(count: int, seed: int = 0) -> list[list[dict]]:
    """Short user/assistant exchanges (arithmetic and colours)."""
    rng = np.random.default_rng(seed)
    conversations = []
    for _ in range(count):
        if rng.random() < 0.5:
            x, y = (int(v) for v in rng.integers(0, 10, 2))
            turn = [
                {"role": "user", "content": f"What is {x} plus {y}?"},
                {"role": "assistant", "content": f"{x} plus {y} is {x + y}."},
            ]
        else:
            name = str(rng.choice(TRAIN_NAMES))
            colour = str(rng.choice(["red", "blue", "green", "yellow", "purple"]))
            turn = [
                {"role": "user", "content": f"{name} likes {colour}. What does {name} like?"},
                {"role": "assistant", "content": f"{name} likes {colour}."},
            ]
        conversations.append(turn)
    return conversations
