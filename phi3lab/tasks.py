"""Small synthetic tasks that show well-known circuits.

The shipped model `phi3lab_tiny_en` is trained on text from these generators
(see `scripts/train_tiny.py`), and the notebooks and tests probe it with
held-out examples from the same generators:

* repeated random word sequences (induction heads), with varied periods;
* name-mover sentences: "When Mary and John went to the store, John gave a
  drink to" -> " Mary" (indirect object identification), in both orders
  (the repeated name can be introduced first or second), several templates,
  with distractor names, and with held-out names and a held-out template;
* short chat turns in Phi-3's format.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from phi3lab.checks import check_choice, check_positive_int, check_token_ids, is_int
from phi3lab.errors import bad_argument

TRAIN_NAMES = [
    "Mary",
    "John",
    "Alice",
    "Bob",
    "Sarah",
    "James",
    "Emma",
    "David",
    "Laura",
    "Peter",
    "Anna",
    "Mark",
    "Julia",
    "Paul",
    "Kate",
    "Tom",
    "Lucy",
    "Sam",
    "Nora",
    "Eric",
    "Grace",
    "Henry",
    "Ivy",
    "Jack",
    "Rose",
    "Adam",
    "Clara",
    "Leo",
    "Mia",
    "Oscar",
    "Ruth",
    "Victor",
    "Zoe",
    "Hugo",
    "Ella",
    "Felix",
    "Iris",
    "Owen",
    "Vera",
    "Max",
]
HELD_OUT_NAMES = ["Diana", "Frank", "Helen", "Ben", "Olivia", "Carl", "Sophie", "Dan", "Irene", "Luke"]
PLACES = ["store", "park", "school", "office", "market", "station", "library", "garden", "beach", "cafe"]
OBJECTS = ["drink", "book", "ball", "letter", "gift", "key", "phone", "ticket", "flower", "cake"]
VERBS = ("gave", "handed", "passed", "sent", "showed")
# `{a}` and `{b}` are introduced in this order; `{s}` is the subject named
# again (the repeated name) and the answer is the other one.
TEMPLATES = (
    "When {a} and {b} went to the {place}, {s} {verb} a {obj} to",
    "After {a} and {b} arrived at the {place}, {s} {verb} a {obj} to",
    "Then {a} and {b} walked to the {place}, and {s} {verb} the {obj} to",
    "{a} and {b} were at the {place}. {s} {verb} a {obj} to",
    "While {a} and {b} were working at the {place}, {s} {verb} the {obj} to",
    "The {place} was quiet when {a} and {b} came in, so {s} {verb} a {obj} to",
    "{a} met {b} near the {place}, and later {s} {verb} the {obj} to",
    "Yesterday {a} and {b} had lunch at the {place}. Then {s} {verb} a {obj} to",
    "In the morning {a} and {b} left for the {place}, where {s} {verb} a {obj} to",
    "Once {a} and {b} found the {place}, {s} quickly {verb} a {obj} to",
)
# Kept out of every training sentence: its structure (place first, names
# after it) is new, its words are not.
HELD_OUT_TEMPLATES = ("At the {place}, {a} and {b} were working, and {s} {verb} a {obj} to",)
# Distractors put more repeated names in front of the pair, so the answer is
# still the only name that occurs once, but neither "the first name" nor
# "not the last name" finds it.
DISTRACTORS = (
    "{c} was at home, and {c} was tired. ",
    "{s} and {c} talked, and {c} left. ",
)
ORDERS = ("ABBA", "BABA")
WORDS = [
    "red",
    "blue",
    "green",
    "river",
    "stone",
    "cloud",
    "apple",
    "window",
    "seven",
    "orange",
    "paper",
    "glass",
    "music",
    "light",
    "table",
    "dream",
    "silver",
    "north",
    "winter",
    "coffee",
    "bridge",
    "horse",
    "candle",
    "forest",
    "mirror",
    "rocket",
    "pencil",
    "garden",
    "ocean",
    "thunder",
    "valley",
    "yellow",
    "copper",
    "lemon",
    "tiger",
    "purple",
    "castle",
    "desert",
    "island",
    "planet",
    "violin",
    "marble",
    "spider",
]


@dataclasses.dataclass(frozen=True)
class NameMoverPrompt:
    """A prompt whose correct next word is `answer` (the indirect object),
    with `counterfactual` the subject named twice. Both are bare names; their
    token ids come from `name_token(tokenizer, name)`. `order` is "ABBA" when
    the answer is introduced first, "BABA" when the repeated name is;
    `distractor` is the index into `DISTRACTORS` or -1."""

    text: str
    answer: str
    counterfactual: str
    order: str = "ABBA"
    template: str = ""
    distractor: int = -1

    def corrupted(self) -> str:
        """The same prompt with the two names swapped, so the answer flips."""
        swap = {self.answer: self.counterfactual, self.counterfactual: self.answer}
        return " ".join(_swap_word(word, swap) for word in self.text.split(" "))

    def subject_flipped(self) -> str:
        """The same prompt with the subject's last mention (S2) replaced by
        the answer, so the answer flips and only that word changes (the
        corrupted prompts of TransformerLens's IOI demo). Every difference
        from the clean run then starts at one position.

        Example:
        >>> NameMoverPrompt("When Mary and John went out, John gave a cup to", "Mary", "John").subject_flipped()
        'When Mary and John went out, Mary gave a cup to'
        """
        words = self.text.split(" ")
        last = max(i for i, word in enumerate(words) if word.rstrip(".,") == self.counterfactual)
        words[last] = _swap_word(words[last], {self.counterfactual: self.answer})
        return " ".join(words)


def _swap_word(word: str, swap: dict[str, str]) -> str:
    stem = word.rstrip(".,")
    return swap.get(stem, stem) + word[len(stem) :]


def name_mover_prompts(
    count: int,
    seed: int = 0,
    names: Sequence[str] = HELD_OUT_NAMES,
    templates: Sequence[str] = TEMPLATES,
    orders: Sequence[str] = ORDERS,
    distractor_rate: float = 0.0,
) -> list[NameMoverPrompt]:
    """`count` name-mover prompts using `names` (held-out ones by default).

    Args:
        count: number of prompts.
        seed: seed of the generator.
        names: the names to draw from (at least 2, or 3 with distractors).
        templates: format strings with `{a}`, `{b}`, `{s}`, `{place}`,
            `{verb}`, `{obj}`.
        orders: the orders to draw from: "ABBA" (the answer is named first,
            the subject second) and/or "BABA" (the subject is named first).
        distractor_rate: probability of a distractor sentence in front.

    Example:
    >>> prompt = name_mover_prompts(1, names=("Mary", "John"), templates=TEMPLATES[:1], orders=("ABBA",))[0]
    >>> prompt.text.startswith(f"When {prompt.answer} and {prompt.counterfactual}")
    True
    """
    bad = [order for order in orders if order not in ORDERS]
    if bad or not orders:
        raise bad_argument("orders", orders, f"a non-empty sequence of {ORDERS}")
    if len(set(names)) < (3 if distractor_rate > 0 else 2):
        raise bad_argument("names", names, "at least 2 distinct names (3 with distractors)")
    rng = np.random.default_rng(seed)
    prompts = []
    for _ in range(count):
        picked = [str(name) for name in rng.choice(names, 3 if distractor_rate > 0 else 2, replace=False)]
        answer, subject, third = (picked + [""])[:3]
        order = str(orders[rng.integers(len(orders))])
        template = str(templates[rng.integers(len(templates))])
        first, second = (answer, subject) if order == "ABBA" else (subject, answer)
        fields = {"place": rng.choice(PLACES), "verb": rng.choice(VERBS), "obj": rng.choice(OBJECTS)}
        text = template.format(a=first, b=second, s=subject, **fields)
        distractor = -1
        if distractor_rate > 0 and rng.random() < distractor_rate:
            distractor = int(rng.integers(len(DISTRACTORS)))
            text = DISTRACTORS[distractor].format(c=third, s=subject) + text
        prompts.append(NameMoverPrompt(text, answer, subject, order, template, distractor))
    return prompts


def name_token(tokenizer, name: str) -> int:
    """The id of `name`'s first token as it appears after a space inside a
    sentence. SentencePiece prefixes a word with "▁" by itself, so encode the
    bare name: `encode(" Mary")` would start with a lone "▁" token."""
    return tokenizer.encode(name.strip())[0]


@dataclasses.dataclass(frozen=True)
class NameMoverBatch:
    """Name-mover prompts as one right-padded batch.

    Attributes:
        token_ids, padding_mask: `[N, T]` (padding on the right, so causal
            attention leaves every real position as it is alone).
        last: `[N]`, the position of each prompt's last token.
        answer, counterfactual: `[N]` token ids of the two names.
    """

    token_ids: np.ndarray
    padding_mask: np.ndarray
    last: np.ndarray
    answer: np.ndarray
    counterfactual: np.ndarray


def name_mover_batch(tokenizer, prompts: Sequence[NameMoverPrompt], corrupted: bool | str = False) -> NameMoverBatch:
    """Encode `prompts` into a `NameMoverBatch`, keeping the clean answer.

    Args:
        tokenizer: a `Phi3Tokenizer`.
        prompts: `NameMoverPrompt`s.
        corrupted: False (the prompts' texts), True or `"swap"` (their
            `corrupted()` texts: the two names swapped), or `"flip"` (their
            `subject_flipped()` texts: S2 becomes the answer's name).

    Example:
    >>> batch = name_mover_batch(tokenizer, name_mover_prompts(8))
    >>> batch.token_ids.shape[0], batch.answer.shape
    (8, (8,))
    """
    check_choice("corrupted", corrupted, (False, True, "swap", "flip"))
    if corrupted == "flip":
        texts = [prompt.subject_flipped() for prompt in prompts]
    elif corrupted:
        texts = [prompt.corrupted() for prompt in prompts]
    else:
        texts = [prompt.text for prompt in prompts]
    token_ids, padding_mask = tokenizer.encode_batch(texts)
    return NameMoverBatch(
        token_ids,
        padding_mask,
        padding_mask.sum(1) - 1,
        np.array([name_token(tokenizer, prompt.answer) for prompt in prompts]),
        np.array([name_token(tokenizer, prompt.counterfactual) for prompt in prompts]),
    )


def name_mover_metrics(logits: np.ndarray, batch: NameMoverBatch) -> dict[str, float]:
    """How well next-token `logits` `[N, T, V]` solve `batch`: `top1` (the
    answer is the most likely token), `beats` (the answer scores above the
    repeated name) and `logit_diff` (answer minus repeated name, mean)."""
    final = np.asarray(logits)[np.arange(len(batch.last)), batch.last].astype(np.float64)
    rows = np.arange(len(final))
    diff = final[rows, batch.answer] - final[rows, batch.counterfactual]
    return {
        "top1": float(np.mean(final.argmax(-1) == batch.answer)),
        "beats": float(np.mean(diff > 0)),
        "logit_diff": float(np.mean(diff)),
    }


def repeated_words(period: int, repeats: int = 2, seed: int = 0) -> str:
    """A random sequence of `period` words from `WORDS`, repeated."""
    rng = np.random.default_rng(seed)
    words = list(rng.choice(WORDS, period))
    return " ".join(words * repeats)


def repeated_tokens(
    vocabulary_size: int,
    seq_len: int,
    num_sequences: int = 1,
    seed: int = 0,
    bos_token: int | None = 1,
    low: int = 0,
) -> np.ndarray:
    """Random sequences repeated twice: `[bos, r_1..r_n, r_1..r_n]`.

    The `r_i` are drawn from `[low, vocabulary_size)` without `bos_token`,
    distinct within a sequence when there are enough ids, so each repeated
    token has exactly one earlier copy (`analysis.head_scores` scores
    induction heads on them).

    Args:
        vocabulary_size: int. Ids are below it.
        seq_len: int. Length of the sequence that is repeated.
        num_sequences: int. Rows of the result. Defaults to 1.
        seed: int. Seed of the random sequences.
        bos_token: the first token of every row, or None for none.
        low: int. Smallest id drawn (e.g. 3 to skip `<unk>`, `<s>`,
            `</s>`). Defaults to 0.

    Returns:
        int32 `[num_sequences, 2 * seq_len + (bos_token is not None)]`.

    Example:
    >>> repeated_tokens(100, 3, seed=1).shape
    (1, 7)
    """
    check_positive_int("vocabulary_size", vocabulary_size)
    check_positive_int("seq_len", seq_len)
    check_positive_int("num_sequences", num_sequences)
    if bos_token is not None:
        check_token_ids("bos_token", bos_token, vocabulary_size, ndim=0)
    if not is_int(low) or not 0 <= low < vocabulary_size:
        raise bad_argument("low", low, f"an int in [0, {vocabulary_size})")
    pool = np.array([i for i in range(low, vocabulary_size) if i != bos_token])
    rng = np.random.default_rng(seed)
    first = np.stack([rng.choice(pool, seq_len, replace=seq_len > len(pool)) for _ in range(num_sequences)])
    ids = np.concatenate([first, first], axis=1)
    if bos_token is not None:
        ids = np.concatenate([np.full((num_sequences, 1), bos_token), ids], axis=1)
    return ids.astype(np.int32)


def chat_turns(count: int, seed: int = 0, names: Sequence[str] = TRAIN_NAMES) -> list[list[dict]]:
    """Short user/assistant exchanges (arithmetic, and colours a person from
    `names` likes)."""
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
            name = str(rng.choice(names))
            colour = str(rng.choice(["red", "blue", "green", "yellow", "purple"]))
            turn = [
                {"role": "user", "content": f"{name} likes {colour}. What does {name} like?"},
                {"role": "assistant", "content": f"{name} likes {colour}."},
            ]
        conversations.append(turn)
    return conversations
