"""Fuzzing every public entry of phi3lab with bad input (hypothesis).

Each generated input is wrong in one known way, and must fail fast with a
`ValueError` or `TypeError` (a `KeyError` only for a trace lookup: `tr[name]`
and the analyses that need a name the trace did not capture) that

* names the bad argument in its message,
* is raised from phi3lab's own code (the innermost traceback frame lies in the
  `phi3lab` package, not in JAX, NumPy, Keras or SentencePiece),
* comes before anything is compiled (`compiled_count` does not move), and
* never hangs (`pytest.mark.timeout`).

Afterwards the model and a trace taken before the fuzzing still work: a new
trace equals the old one bit for bit.

Each fuzz test counts the examples that reached these checks and fails if
fewer than half of its `max_examples` did (a strategy that mostly fails its
own filters would otherwise check almost nothing). Every test is independent
of the others and of their order.
"""

from __future__ import annotations

import contextvars
import fnmatch
import functools
import json
import math
import os
import re
import string
import traceback
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import phi3lab
from conftest import SIZE_ARGUMENTS, sizes
from phi3lab import analysis
from phi3lab import hooks as H
from phi3lab.presets import save_preset
from phi3lab.presets.registry import BUILTIN
from phi3lab.tokenization.tokenizer import Phi3Tokenizer
from phi3lab.tokenization.training import train_sentencepiece
from phi3lab.tracing import compiled_count
from phi3lab.tracing.names import all_names

PACKAGE = Path(phi3lab.__file__).resolve().parent
#: The bad inputs checked by the running fuzz test (a list set by `fuzz`).
CHECKED: contextvars.ContextVar[list | None] = contextvars.ContextVar("checked", default=None)

# The model every test shares: 64 tokens, 2 layers, hidden 16, 4 query heads
# of size 4 over 2 key/value heads, 32 positions.
VOCAB, LAYERS, HIDDEN, FFN, HQ, HKV, MAX_LEN = 64, 2, 16, 32, 4, 2, 32
BASE_KWARGS = sizes(VOCAB, LAYERS, HIDDEN, FFN, HQ, HKV, MAX_LEN)
PAIRS = HIDDEN // HQ // 2
SU_KWARGS = dict(
    BASE_KWARGS,
    rope_scaling_type="su",
    pretraining_sequence_length=8,
    rope_scaling_short_factor=[1.0] * PAIRS,
    rope_scaling_long_factor=[2.0] * PAIRS,
)
IDS = np.array([[1, 5, 9, 13, 17, 21], [2, 4, 8, 16, 32, 63]], np.int32)
B, T = IDS.shape
NAMES = all_names(LAYERS)

FUZZ = settings(
    deadline=None,
    database=None,
    derandomize=False,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
)


#: PHI3LAB_FUZZ_SCALE=10 runs ten times as many examples (a deeper, slower search).
SCALE = float(os.environ.get("PHI3LAB_FUZZ_SCALE", "1"))


def fuzz(max_examples: int):
    """Hypothesis settings for `max_examples` (times `SCALE`), checking after
    the run that at least half of the examples reached `expect_bad`."""
    count = max(1, int(max_examples * SCALE))

    def decorate(test):
        test = settings(FUZZ, max_examples=count)(test)

        @functools.wraps(test)
        def counted(*args, **kwargs):
            checked = []
            token = CHECKED.set(checked)
            try:
                test(*args, **kwargs)
            finally:
                CHECKED.reset(token)
            assert len(checked) >= count // 2, f"only {len(checked)} of {count} examples were checked"

        return counted

    return decorate


def arg(name: str) -> str:
    """How phi3lab messages name an argument: "`name` must be ..." (or
    "received name=...", which `expect_bad` accepts too)."""
    return f"`{name}"


def case(function: str, argument: str, strategy):
    """(function, {argument: bad value}, the message fragment naming `argument`) cases."""
    return st.tuples(st.just(function), st.fixed_dictionaries({argument: strategy}), st.just(arg(argument)))


def expect_bad(call, *fragments, errors=(ValueError, TypeError)):
    """Run `call`; it must raise one of `errors`, from phi3lab code, with a
    message holding at least one of `fragments`. Counts the example."""
    try:
        call()
    except errors as error:
        # str(KeyError) is the repr of its message; read the message itself
        message = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
        frames = traceback.extract_tb(error.__traceback__)
        origin = Path(frames[-1].filename).resolve()
        assert origin.is_relative_to(PACKAGE), (
            f"{type(error).__name__} escaped from {origin}:{frames[-1].lineno}, not from phi3lab: {message}"
        )
        # "`name` must be ..." or "... received name=value"
        named = lambda f: f in message or (f.startswith("`") and re.search(rf"(?<![\w.]){re.escape(f[1:])}=", message))
        assert any(named(f) for f in fragments), f"none of {fragments} in: {message}"
    except Exception as error:  # the wrong kind of exception: show where it came from
        raise AssertionError(
            f"expected {[e.__name__ for e in errors]} naming {fragments}; got "
            f"{type(error).__name__}: {error}\n{''.join(traceback.format_tb(error.__traceback__)[-3:])}"
        ) from error
    else:
        raise AssertionError(f"no error; expected one naming {fragments}")
    checked = CHECKED.get()
    if checked is not None:
        checked.append(call)


# === Shared objects (built once) ============================================


@functools.cache
def get_model():
    return phi3lab.Phi3Backbone(**BASE_KWARGS)


@functools.cache
def get_traces():
    """(full trace, trace holding only blocks.0.hook_resid_pre, compiled count)."""
    model = get_model()
    full = phi3lab.trace(model, IDS)
    partial = phi3lab.trace(model, IDS, names="blocks.0.hook_resid_pre")
    return full, partial, compiled_count(model)


CORPUS = [
    "the cat sat on the mat",
    "hello world",
    "attention heads copy tokens",
    "residual stream and logit lens",
    "Paris is the capital of France",
] * 20


@functools.cache
def get_tokenizer():
    return Phi3Tokenizer(train_sentencepiece(CORPUS, vocab_size=300))


@pytest.fixture(scope="module")
def model():
    return get_model()


@pytest.fixture(scope="module")
def traces():
    return get_traces()


@pytest.fixture(scope="module")
def tok():
    return get_tokenizer()


@pytest.fixture(scope="module")
def preset_dir(tmp_path_factory, model):
    return save_preset(model, tmp_path_factory.mktemp("fuzz_preset") / "kh")


# === Strategies of bad values ===============================================

finite = st.floats(-1e6, 1e6, allow_nan=False)
floats = st.floats(allow_nan=True, allow_infinity=True)
short_text = st.text(max_size=6)
#: values that are neither ints nor containers of valid things
junk = st.one_of(
    st.none(),
    st.booleans(),
    floats,
    short_text,
    st.binary(max_size=4),
    st.lists(st.integers(-3, 70), max_size=3).map(lambda v: [v, v + [1]]),  # ragged
    st.just(object()),
    st.complex_numbers(max_magnitude=10, allow_nan=False),
    finite.map(np.float32),
    st.just({"a": 1}),
)
#: not an int (floats, strings, None, bools, containers, objects)
not_int = st.one_of(junk, st.lists(st.integers(0, 3), max_size=3), st.floats(0.5, 5).map(np.float64))
not_positive = st.one_of(st.integers(max_value=0), st.integers(-1000, 0).map(np.int64))
bad_positive_int = st.one_of(not_int, not_positive)
not_bool = st.one_of(st.integers(), floats, short_text, st.none(), st.lists(st.booleans(), max_size=2))


def pick(name, strategy, *fragments):
    """(argument name, bad value, message fragments) cases."""
    return st.tuples(st.just(name), strategy, st.just(fragments or (arg(name),)))


# === Phi3Backbone(...) ======================================================

INT_ARGS = list(SIZE_ARGUMENTS)
bad_real = st.one_of(
    st.floats(max_value=0),
    st.just(math.nan),
    st.just(math.inf),
    st.just(-math.inf),
    short_text,
    st.none(),
    st.booleans(),
    st.lists(finite, max_size=2),
    st.integers(max_value=0),
)
bad_dropout = st.one_of(
    floats.filter(lambda x: not 0 <= x < 1),
    short_text,
    st.none(),
    st.booleans(),
    st.integers(1, 100),
    st.integers(max_value=-1),
)
bad_factor_entry = st.one_of(
    st.floats(max_value=0), st.just(math.nan), st.just(math.inf), short_text, st.none(), st.booleans(), st.just([1.0])
)


@st.composite
def bad_factor_list(draw):
    kind = draw(st.sampled_from(["length", "entry", "type"]))
    if kind == "length":
        n = draw(st.integers(0, 8).filter(lambda n: n != PAIRS))
        return draw(st.lists(st.floats(0.1, 10), min_size=n, max_size=n))
    if kind == "entry":
        values = draw(st.lists(st.floats(0.1, 10), min_size=PAIRS, max_size=PAIRS))
        values[draw(st.integers(0, PAIRS - 1))] = draw(bad_factor_entry)
        return values
    return draw(st.one_of(st.none(), short_text, st.floats(0.1, 10), st.integers(), st.just(object())))


constructor_cases = st.one_of(
    *[pick(name, bad_positive_int) for name in INT_ARGS],
    # the head layout: hidden_dim must split into an even head size over heads
    pick("hidden_dim", st.integers(1, 512).filter(lambda h: h % HQ or (h // HQ) % 2)),
    pick(
        "num_query_heads",
        st.integers(1, 64).filter(lambda q: not (HIDDEN % q == 0 and (HIDDEN // q) % 2 == 0 and q % HKV == 0)),
    ),
    pick("num_key_value_heads", st.integers(1, 64).filter(lambda k: HQ % k)),
    pick("layer_norm_epsilon", bad_real),
    pick("rope_max_wavelength", bad_real),
    pick("dropout", bad_dropout),
    pick("sliding_window", st.one_of(not_positive, st.floats(0.5, 10), short_text, st.booleans())),
    pick(
        "rope_scaling_type",
        st.one_of(
            short_text.filter(lambda s: s not in ("su", "longrope")),
            st.integers(),
            st.booleans(),
            st.lists(st.just("su"), max_size=1),
        ),
    ),
    pick("rope_scaling_short_factor", st.lists(st.floats(0.1, 10), min_size=1, max_size=3)),  # without "su"
    pick("rope_scaling_long_factor", st.one_of(st.lists(finite, min_size=1, max_size=3), short_text)),
    pick(
        "dtype",
        st.one_of(
            short_text.map(lambda s: "no_such_dtype" + s),
            st.integers(),
            st.floats(),
            st.dictionaries(short_text, st.integers(), max_size=2),
            st.just({"class_name": "Lambda", "config": {}}),
            st.lists(short_text, max_size=2),
        ),
    ),
)
su_cases = st.one_of(
    pick("rope_scaling_short_factor", bad_factor_list()),
    pick("rope_scaling_long_factor", bad_factor_list()),
    pick("pretraining_sequence_length", st.just(1)),  # log(1) = 0 in the attention factor
)


@pytest.mark.timeout(120)
@fuzz(200)
@given(case=st.one_of(constructor_cases.map(lambda c: (BASE_KWARGS, c)), su_cases.map(lambda c: (SU_KWARGS, c))))
def test_constructor(case):
    base, (name, value, fragments) = case
    expect_bad(lambda: phi3lab.Phi3Backbone(**{**base, name: value}), *fragments)


# === Phi3Backbone.from_preset ===============================================


def _not_a_preset(text: str) -> bool:
    try:
        return not Path(text).is_dir() and not text.startswith(("kaggle://", "hf://")) and text not in BUILTIN
    except (OSError, ValueError):
        return True


json_values = st.recursive(
    st.one_of(
        st.none(), st.booleans(), st.integers(-5, 5), st.floats(allow_nan=False, allow_infinity=False), short_text
    ),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(short_text, inner, max_size=3)),
    max_leaves=8,
)
override_names = st.sampled_from(INT_ARGS + ["dropout", "layer_norm_epsilon", "sliding_window"])


@pytest.mark.timeout(120)
@fuzz(150)
@given(data=st.data())
def test_from_preset(data, preset_dir, tmp_path_factory):
    kind = data.draw(st.sampled_from(["name", "type", "override", "unknown", "load_weights", "config"]))
    if kind == "name":
        name = data.draw(st.text(max_size=20).filter(_not_a_preset))
        expect_bad(lambda: phi3lab.Phi3Backbone.from_preset(name), arg("preset"))
    elif kind == "type":
        value = data.draw(
            st.one_of(st.integers(), st.none(), st.binary(max_size=4), st.lists(short_text, max_size=2), floats)
        )
        expect_bad(lambda: phi3lab.Phi3Backbone.from_preset(value), arg("preset"))
    elif kind == "override":
        name = data.draw(override_names)
        value = data.draw(
            bad_positive_int if name in INT_ARGS else st.one_of(st.integers(-5, 0), short_text, st.booleans())
        )
        if name == "dropout":
            value = data.draw(bad_dropout)
        elif name == "layer_norm_epsilon":
            value = data.draw(bad_real)
        load = data.draw(st.booleans())
        expect_bad(lambda: phi3lab.Phi3Backbone.from_preset(preset_dir, load_weights=load, **{name: value}), arg(name))
    elif kind == "unknown":
        name = data.draw(
            st.text(min_size=1, max_size=10).filter(
                lambda s: (
                    s not in BASE_KWARGS
                    and s not in SU_KWARGS
                    and s
                    not in (
                        "preset",
                        "load_weights",
                        "dtype",
                        "dropout",
                        "layer_norm_epsilon",
                        "rope_max_wavelength",
                        "sliding_window",
                    )
                )
            )
        )
        expect_bad(lambda: phi3lab.Phi3Backbone.from_preset(preset_dir, **{name: 1}), repr(name))
    elif kind == "load_weights":
        value = data.draw(not_bool)
        expect_bad(lambda: phi3lab.Phi3Backbone.from_preset(preset_dir, load_weights=value), arg("load_weights"))
    else:  # a directory whose config.json is not a Phi-3 preset
        directory = tmp_path_factory.mktemp("bad_config")
        config = data.draw(
            st.one_of(
                json_values.filter(lambda v: not isinstance(v, dict) or not ({"class_name", "model_type"} & set(v))),
                st.fixed_dictionaries(
                    {"class_name": short_text.filter(lambda s: s != "Phi3Backbone")}, optional={"config": json_values}
                ),
                st.fixed_dictionaries(
                    {"model_type": st.one_of(short_text, st.integers()).filter(lambda s: s != "phi3")},
                    optional={"vocab_size": json_values},
                ),
            )
        )
        (directory / "config.json").write_text(json.dumps(config))
        expect_bad(lambda: phi3lab.Phi3Backbone.from_preset(directory), str(directory))


# === Phi3Tokenizer ==========================================================

letters = st.text(alphabet=string.ascii_letters + " ", min_size=1, max_size=12)
NOT_A_PIECE = "<<definitely-not-a-piece>>"  # longer than max_sentencepiece_length


@st.composite
def bad_ids(draw, vocabulary_size):
    """A 1-D id list with at least one id outside [0, vocabulary_size)."""
    ids = draw(st.lists(st.integers(0, vocabulary_size - 1), max_size=5))
    bad = draw(st.one_of(st.integers(min_value=vocabulary_size), st.integers(max_value=-1)))
    ids.insert(draw(st.integers(0, len(ids))), bad)
    return ids


bad_messages = st.one_of(
    st.one_of(
        st.integers(), st.none(), short_text, st.just([]), st.dictionaries(short_text, short_text, max_size=2)
    ).map(lambda m: (m, arg("messages"))),
    st.tuples(
        st.lists(
            st.one_of(st.integers(), short_text, st.none(), st.lists(st.integers(), max_size=2)), min_size=1, max_size=3
        ),
        st.just(arg("messages")),
    ),
    st.tuples(
        st.lists(
            st.fixed_dictionaries(
                {"role": st.sampled_from(["user", "system", "assistant"])},
                optional={"content": st.one_of(st.integers(), st.none(), st.lists(short_text))},
            ),
            min_size=1,
            max_size=2,
        ),
        st.just(arg("messages")),
    ),
    st.tuples(
        st.lists(
            st.fixed_dictionaries(
                {
                    "role": st.one_of(
                        short_text.filter(lambda r: r not in ("user", "system", "assistant")), st.integers(), st.none()
                    ),
                    "content": short_text,
                }
            ),
            min_size=1,
            max_size=2,
        ),
        st.just(arg("messages")),
    ),
)


def _not_a_file(text: str) -> bool:
    try:
        return not Path(text).exists()
    except (OSError, ValueError):
        return True


@pytest.mark.timeout(120)
@fuzz(250)
@given(data=st.data())
def test_tokenizer(data, tok):
    kind = data.draw(
        st.sampled_from(
            [
                "proto",
                "rstrip",
                "encode",
                "add_bos",
                "texts",
                "padding",
                "padding_side",
                "decode",
                "decode_type",
                "skip",
                "display",
                "space",
                "id_to_token",
                "token_to_id",
                "chat",
                "generation_prompt",
                "from_preset",
            ]
        )
    )
    V = tok.vocabulary_size
    if kind == "proto":
        value = data.draw(
            st.one_of(
                st.binary(max_size=64),
                st.integers(),
                st.none(),
                st.lists(st.integers(0, 255), max_size=3),
                st.text(max_size=20).filter(_not_a_file),
            )
        )
        expect_bad(lambda: Phi3Tokenizer(value), arg("proto"))
    elif kind == "rstrip":
        value = data.draw(
            st.one_of(
                st.integers(),
                st.floats(),
                st.just(object()),
                st.lists(st.integers(), min_size=1, max_size=2),
                st.lists(short_text.filter(lambda s: s not in tok.special_tokens), min_size=1, max_size=2),
                st.lists(st.lists(st.integers(), max_size=1), min_size=1, max_size=2),
            )
        )
        expect_bad(lambda: Phi3Tokenizer(tok.proto, rstrip_tokens=value), arg("rstrip_tokens"))
    elif kind == "encode":
        value = data.draw(
            st.one_of(st.integers(), st.none(), st.binary(max_size=4), st.lists(short_text, max_size=2), floats)
        )
        expect_bad(lambda: tok.encode(value), arg("text"))
    elif kind == "add_bos":
        value = data.draw(not_bool)
        expect_bad(lambda: tok.encode("hello", add_bos=value), arg("add_bos"))
    elif kind == "texts":
        value = data.draw(
            st.one_of(
                short_text,
                st.integers(),
                st.none(),
                st.lists(st.one_of(short_text, st.integers(), st.none()), min_size=1, max_size=3).filter(
                    lambda v: not all(isinstance(t, str) for t in v)
                ),
            )
        )
        expect_bad(lambda: tok.encode_batch(value), arg("texts"))
    elif kind == "padding":
        value = data.draw(
            st.one_of(
                st.integers(max_value=0),
                st.floats(),
                short_text.filter(lambda s: s != "longest"),
                st.booleans(),
                st.none(),
                st.integers(1, 3),
            )
        )
        expect_bad(lambda: tok.encode_batch(["the cat sat on the mat and hello world"], padding=value), arg("padding"))
    elif kind == "padding_side":
        value = data.draw(st.one_of(short_text.filter(lambda s: s not in ("left", "right")), st.integers(), st.none()))
        expect_bad(lambda: tok.encode_batch(["hello"], padding_side=value), arg("padding_side"))
    elif kind == "decode":
        ids = data.draw(bad_ids(V))
        expect_bad(lambda: tok.decode(ids), arg("ids"))
    elif kind == "decode_type":
        value = data.draw(
            st.one_of(
                st.lists(st.floats(), min_size=1, max_size=3),
                short_text.filter(bool),
                st.none(),
                st.lists(st.integers(0, 3), min_size=1, max_size=3).map(lambda v: [v, v + [0]]),
                st.lists(st.integers(0, 3), min_size=1, max_size=3).map(lambda v: [v, v]),  # 2-D
                st.lists(st.integers(min_value=2**64), min_size=1, max_size=2),
            )
        )
        expect_bad(lambda: tok.decode(value), arg("ids"))
    elif kind == "skip":
        value = data.draw(not_bool)
        expect_bad(lambda: tok.decode([5, 6], skip_special_tokens=value), arg("skip_special_tokens"))
    elif kind == "display":
        ids = data.draw(bad_ids(V))
        expect_bad(lambda: tok.display_tokens(ids), arg("ids"))
    elif kind == "space":
        value = data.draw(st.one_of(st.integers(), st.none(), st.binary(max_size=2), st.lists(short_text, max_size=1)))
        expect_bad(lambda: tok.display_tokens([5], space=value), arg("space"))
    elif kind == "id_to_token":
        value = data.draw(
            st.one_of(
                st.integers(min_value=V), st.integers(max_value=-1), st.floats(), short_text, st.none(), st.booleans()
            )
        )
        expect_bad(lambda: tok.id_to_token(value), arg("id"))
    elif kind == "token_to_id":
        value = data.draw(st.one_of(st.integers(), st.none(), st.text(max_size=5).map(lambda s: NOT_A_PIECE + s)))
        expect_bad(lambda: tok.token_to_id(value), arg("token"))
    elif kind == "chat":
        messages, fragment = data.draw(bad_messages)
        expect_bad(lambda: tok.apply_chat_template(messages), fragment)
    elif kind == "generation_prompt":
        value = data.draw(not_bool)
        expect_bad(
            lambda: tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=value),
            arg("add_generation_prompt"),
        )
    else:
        value = data.draw(st.one_of(st.text(max_size=20).filter(_not_a_preset), st.integers(), st.none()))
        expect_bad(lambda: Phi3Tokenizer.from_preset(value), arg("preset"))


# === phi3lab.trace ==========================================================


def _empty_range(s: slice) -> bool:
    return len(range(*s.indices(T))) == 0


int_arrays = lambda shape, lo, hi: hnp.arrays(np.int64, shape, elements=st.integers(lo, hi))


@st.composite
def out_of_range_ids(draw):
    shape = draw(st.one_of(st.tuples(st.integers(1, 3), st.integers(1, MAX_LEN)), st.tuples(st.integers(1, MAX_LEN))))
    ids = draw(int_arrays(shape, 0, VOCAB - 1))
    flat = ids.reshape(-1)
    flat[draw(st.integers(0, flat.size - 1))] = draw(st.one_of(st.integers(VOCAB, 2**40), st.integers(-(2**40), -1)))
    return ids


bad_inputs = st.one_of(
    out_of_range_ids(),
    hnp.arrays(hnp.floating_dtypes(), st.tuples(st.integers(1, 2), st.integers(1, 6))),  # float ids
    hnp.arrays(np.bool_, st.tuples(st.integers(1, 2), st.integers(1, 6))),
    st.integers(0, VOCAB - 1),  # a scalar
    hnp.arrays(np.int32, hnp.array_shapes(min_dims=3, max_dims=4, max_side=3), elements=st.integers(0, 5)),
    st.tuples(st.integers(1, 3)).map(lambda s: np.zeros(s + (0,), np.int32)),  # no positions
    st.integers(MAX_LEN + 1, 200).map(lambda n: np.ones((1, n), np.int32)),  # too long
    st.lists(st.integers(0, 5), min_size=1, max_size=4).map(lambda v: [v, v + [1]]),  # ragged
    st.lists(st.one_of(st.integers(0, 5), st.text(max_size=2)), min_size=2, max_size=4).filter(
        lambda v: any(isinstance(x, str) for x in v) and not all(isinstance(x, str) for x in v)
    ),
    st.just(None),
    st.just({"a": 1}),
    st.just(object()),
)


@st.composite
def bad_padding_masks(draw):
    kind = draw(st.sampled_from(["shape", "values", "float", "strings", "ragged"]))
    if kind == "shape":
        shape = draw(hnp.array_shapes(min_dims=0, max_dims=3, max_side=7).filter(lambda s: s != (B, T)))
        return draw(int_arrays(shape, 0, 1))
    if kind == "values":
        mask = draw(int_arrays((B, T), 0, 1))
        mask[draw(st.integers(0, B - 1)), draw(st.integers(0, T - 1))] = draw(st.integers(2, 10) | st.integers(-10, -1))
        return mask
    if kind == "float":
        mask = draw(int_arrays((B, T), 0, 1)).astype(np.float64)
        mask[0, draw(st.integers(0, T - 1))] = draw(st.sampled_from([0.5, math.nan, math.inf, -1.0, 0.999]))
        return mask
    if kind == "strings":
        return np.full((B, T), draw(st.text(min_size=1, max_size=2)))
    return [[1] * T, [1] * (T - 1)]


TOK = object()  # stands for the test tokenizer (a fixture)


def _matches_nothing(pattern: str) -> bool:
    return not fnmatch.filter(NAMES, pattern)


def _noop(x, ctx):
    return x


no_match = st.text(max_size=12).filter(_matches_nothing)
bad_names = st.one_of(
    no_match,
    st.integers(),
    floats,
    st.booleans(),
    st.just(object()),
    st.lists(st.one_of(no_match, st.integers(), st.none()), min_size=1, max_size=3).flatmap(
        lambda bad: st.lists(st.sampled_from(NAMES), max_size=2).map(lambda good: good + bad)
    ),
    st.binary(min_size=1, max_size=3),
)
bad_hooks = st.one_of(
    st.integers(),
    floats,
    st.booleans(),
    st.just(object()),
    short_text,
    st.binary(max_size=3),
    st.dictionaries(
        st.one_of(st.integers(), st.none(), st.tuples(st.integers())), st.just(_noop), min_size=1, max_size=2
    ),
    st.dictionaries(no_match, st.just(_noop), min_size=1, max_size=2),
    st.dictionaries(
        st.sampled_from(NAMES),
        st.one_of(st.integers(), short_text, st.lists(st.integers(), max_size=1)),
        min_size=1,
        max_size=2,
    ),
    st.lists(
        st.one_of(st.integers(), st.tuples(short_text), st.tuples(short_text, st.just(_noop), st.integers())),
        min_size=1,
        max_size=2,
    ),
    st.lists(st.tuples(no_match, st.just(_noop)), min_size=1, max_size=2),
)
small = st.integers(-40, 40)
bad_queries = st.one_of(
    st.builds(slice, small, small).filter(_empty_range),
    st.builds(slice, st.none() | small, st.none() | small, st.integers(-3, 5).filter(lambda s: s != 1)),
    st.builds(slice, st.one_of(st.floats(), short_text), st.none() | small),
    st.builds(slice, st.none() | small, st.one_of(st.floats(), short_text)),
    st.tuples(small, small).filter(lambda q: not 0 <= q[0] < q[1] <= T),
    st.lists(small, min_size=2, max_size=2).filter(lambda q: not 0 <= q[0] < q[1] <= T),
    st.tuples(st.one_of(st.floats(), short_text, st.none(), st.booleans()), small),
    st.lists(small, max_size=5).filter(lambda q: len(q) != 2),
    st.integers(),
    short_text,
    st.booleans(),
    floats,
)
bad_heads = st.one_of(
    st.integers(HQ, 100),
    st.integers(-100, -HQ - 1),
    st.booleans(),
    st.floats(),
    short_text,
    st.just([]),
    st.lists(st.integers(0, HQ - 1), max_size=3).flatmap(
        lambda good: st.one_of(
            st.integers(HQ, 50), st.integers(-50, -HQ - 1), st.floats(), short_text, st.booleans(), st.none()
        ).map(lambda bad: good + [bad])
    ),
    st.just(object()),
)
bad_budgets = st.one_of(
    st.integers(max_value=0), st.floats(), short_text, st.booleans(), st.lists(st.integers(1, 9), max_size=2)
)

trace_cases = st.one_of(
    bad_inputs.map(lambda v: ({"inputs": v}, (arg("ids"),))),
    st.lists(letters, min_size=1, max_size=2).map(lambda v: ({"inputs": v}, (arg("tokenizer"),))),  # text, no tokenizer
    st.one_of(letters, st.lists(letters, min_size=1, max_size=2)).map(
        lambda v: ({"inputs": v, "tokenizer": TOK}, (arg("ids"),))
    ),  # ids >= the model's vocabulary
    st.tuples(letters, st.one_of(st.integers(), short_text, st.just(object()))).map(
        lambda v: ({"inputs": v[0], "tokenizer": v[1]}, (arg("tokenizer"),))
    ),
    bad_padding_masks().map(lambda v: ({"padding_mask": v}, (arg("padding_mask"),))),
    bad_names.map(lambda v: ({"names": v}, (arg("names"),))),
    bad_hooks.map(lambda v: ({"hooks": v}, (arg("hooks"),))),
    bad_queries.map(lambda v: ({"queries": v}, (arg("queries"),))),
    bad_heads.map(lambda v: ({"heads": v}, (arg("heads"),))),
    bad_budgets.map(lambda v: ({"memory_budget": v}, (arg("memory_budget"),))),
)


@pytest.mark.timeout(180)
@fuzz(300)
@given(case=trace_cases)
def test_trace(case, model, traces, tok):
    kwargs, fragments = case
    kwargs = {"inputs": IDS, **kwargs}
    if kwargs.get("tokenizer") is TOK:
        kwargs["tokenizer"] = tok
    inputs = kwargs.pop("inputs")
    before = compiled_count(model)
    expect_bad(lambda: phi3lab.trace(model, inputs, **kwargs), *fragments)
    assert compiled_count(model) == before


estimate_cases = st.one_of(
    pick("seq_len", st.one_of(bad_positive_int, st.integers(MAX_LEN + 1, 10**12))),
    pick("batch", bad_positive_int),
    pick("names", bad_names),
    pick("queries", st.one_of(st.tuples(st.integers(4, 40), st.integers(-5, 4)), st.integers(), short_text)),
    pick("heads", bad_heads),
)


@pytest.mark.timeout(120)
@fuzz(100)
@given(case=estimate_cases)
def test_estimate(case, model, traces):
    name, value, fragments = case
    kwargs = {"seq_len": 4, name: value}
    before = compiled_count(model)
    expect_bad(lambda: phi3lab.estimate(model, **kwargs), *fragments)
    assert compiled_count(model) == before


# === phi3lab.hooks ==========================================================


@pytest.mark.timeout(120)
@fuzz(200)
@given(data=st.data())
def test_hooks(data, model, traces):
    full, partial, _ = traces
    kind = data.draw(
        st.sampled_from(
            [
                "ablate_layer",
                "ablate_layer_range",
                "ablate_heads",
                "ablate_heads_range",
                "ablate_mode",
                "patch_name",
                "patch_name_type",
                "patch_source",
                "patch_positions",
                "add_name",
                "add_vector",
                "add_scale",
                "add_shape",
                "gqa",
            ]
        )
    )
    before = compiled_count(model)
    run = lambda hooks: phi3lab.trace(model, IDS, hooks=hooks)
    if kind == "ablate_layer":
        value = data.draw(
            st.one_of(st.floats(), short_text, st.none(), st.booleans(), st.lists(st.integers(0, 1), max_size=2))
        )
        expect_bad(lambda: H.ablate_heads(value, [0]), arg("layer"))
    elif kind == "ablate_layer_range":
        value = data.draw(st.integers(LAYERS, 10**6) | st.integers(-(10**6), -LAYERS - 1))
        expect_bad(lambda: run(H.ablate_heads(value, [0])), arg("layer"))
    elif kind == "ablate_heads":
        value = data.draw(
            st.one_of(
                st.none(),
                st.floats(),
                short_text,
                st.just([]),
                st.booleans(),
                st.lists(st.one_of(st.floats(), short_text, st.none(), st.booleans()), min_size=1, max_size=3),
            )
        )
        expect_bad(lambda: H.ablate_heads(0, value), arg("heads"))
    elif kind == "ablate_heads_range":
        value = data.draw(
            st.lists(st.integers(0, HQ - 1), max_size=2).flatmap(
                lambda good: st.one_of(st.integers(HQ, 1000), st.integers(-1000, -HQ - 1)).map(lambda bad: good + [bad])
            )
        )
        expect_bad(lambda: run(H.ablate_heads(1, value)), arg("heads"))
    elif kind == "ablate_mode":
        value = data.draw(
            st.one_of(
                short_text.filter(lambda m: m not in ("zero", "mean")),
                st.integers(),
                st.none(),
                st.lists(short_text, max_size=1),
            )
        )
        expect_bad(lambda: H.ablate_heads(0, [1], mode=value), arg("mode"))
    elif kind == "patch_name":  # a name (or pattern) the source trace did not capture
        name = data.draw(
            st.one_of(st.sampled_from(NAMES[2:]), st.text(max_size=12)).filter(
                lambda n: not fnmatch.filter(partial.names, n)
            )
        )
        expect_bad(lambda: H.patch(name, partial), arg("name"))
    elif kind == "patch_name_type":
        value = data.draw(st.one_of(st.integers(), st.none(), st.lists(short_text, max_size=2), st.binary(max_size=3)))
        expect_bad(lambda: H.patch(value, full), arg("name"))
    elif kind == "patch_source":
        value = data.draw(
            st.one_of(st.integers(), st.none(), short_text, st.dictionaries(short_text, st.integers(), max_size=2))
        )
        expect_bad(lambda: H.patch("blocks.0.hook_resid_pre", value), arg("source_trace"))
    elif kind == "patch_positions":
        value = data.draw(
            st.one_of(
                st.integers(T, 1000),
                st.integers(-1000, -T - 1),
                st.floats(),
                short_text,
                st.just([]),
                st.lists(st.integers(-T, T - 1), max_size=3).flatmap(
                    lambda good: st.integers(T, 99).map(lambda bad: good + [bad])
                ),
                st.just([[0, 1], [2, 3]]),
                st.lists(st.floats(0, 5), min_size=1, max_size=3),
            )
        )
        expect_bad(lambda: H.patch("blocks.0.hook_resid_pre", partial, positions=value), arg("positions"))
    elif kind == "add_name":
        value = data.draw(st.one_of(st.integers(), st.none(), st.lists(short_text, max_size=2)))
        expect_bad(lambda: H.add(value, np.ones(HIDDEN, np.float32)), arg("name"))
    elif kind == "add_vector":
        value = data.draw(
            st.one_of(
                hnp.arrays(
                    hnp.integer_dtypes() | hnp.unsigned_integer_dtypes() | st.just(np.dtype(bool)),
                    hnp.array_shapes(max_dims=2, max_side=HIDDEN),
                ),
                st.lists(st.integers(), min_size=1, max_size=3),
                short_text,
                st.none(),
                st.just(object()),
                st.lists(finite, min_size=1, max_size=3).map(lambda v: [v, v + [1.0]]),
            )
        )
        expect_bad(lambda: H.add("blocks.0.hook_resid_post", value), arg("vector"))
    elif kind == "add_scale":
        value = data.draw(
            st.one_of(
                short_text,
                st.none(),
                st.just(math.nan),
                st.just(math.inf),
                st.booleans(),
                st.lists(finite, min_size=1, max_size=2),
                st.just(object()),
            )
        )
        expect_bad(lambda: H.add("blocks.0.hook_resid_post", np.ones(HIDDEN, np.float32), scale=value), arg("scale"))
    elif kind == "add_shape":  # checked against the site before compiling
        site, width = data.draw(
            st.sampled_from(
                [
                    ("blocks.1.hook_resid_post", HIDDEN),
                    ("blocks.0.mlp.hook_post", FFN),
                    ("hook_logits", VOCAB),
                    ("blocks.0.attn.hook_z", HIDDEN // HQ),
                ]
            )
        )
        shape = data.draw(
            st.one_of(
                st.tuples(st.integers(2, 80).filter(lambda n: n != width)),
                st.tuples(
                    st.integers(1, 3), st.integers(1, 3), st.integers(1, 3), st.integers(1, 3), st.integers(1, 3)
                ),
            )
        )
        expect_bad(lambda: run(H.add(site, np.ones(shape, np.float32))), arg("vector"))
    else:
        which = data.draw(st.sampled_from(["query_head", "key_value_head"]))
        limit = HQ if which == "query_head" else HKV
        fn = H.key_value_head_of if which == "query_head" else H.query_heads_sharing
        # Indices in [-limit, 0) count from the end, as `check_index` documents.
        wrapped = data.draw(st.integers(-limit, -1))
        assert fn(model, wrapped) == fn(model, wrapped + limit)
        value = data.draw(
            st.one_of(
                st.integers(min_value=limit), st.integers(max_value=-limit - 1), st.floats(), short_text, st.none()
            )
        )
        expect_bad(lambda: fn(model, value), arg(which))
    assert compiled_count(model) == before


@functools.cache
def get_short_source(site):
    return phi3lab.trace(get_model(), IDS[:, :4], names=site)


@pytest.mark.timeout(120)
@fuzz(12)
@given(
    positions=st.one_of(st.none(), st.lists(st.integers(0, 3), min_size=1, max_size=2)),
    site=st.sampled_from(["blocks.0.hook_resid_pre", "blocks.1.attn.hook_pattern"]),
)
def test_patch_from_a_trace_of_another_shape(positions, site, model, traces):
    """The mismatch shows only once the run's shapes are known: while the
    program is traced, before anything is compiled."""
    source = get_short_source(site)
    before = compiled_count(model)
    expect_bad(
        lambda: phi3lab.trace(model, IDS, names="hook_logits", hooks=H.patch(site, source, positions)),
        arg("source_trace"),
    )
    assert compiled_count(model) == before


# === phi3lab.analysis =======================================================

bad_batch = st.one_of(st.integers(B, 100), st.integers(-100, -B - 1), st.floats(), short_text, st.none(), st.booleans())
bad_position_list = st.one_of(
    st.integers(T, 100),
    st.integers(-100, -T - 1),
    st.floats(),
    short_text,
    st.lists(st.integers(0, T - 1), max_size=2).flatmap(lambda good: st.integers(T, 50).map(lambda bad: good + [bad])),
    st.just([[0, 1], [1]]),
    st.just([[0], [1]]),
)
bad_token = st.one_of(st.integers(min_value=VOCAB), st.integers(max_value=-1), st.floats(), short_text, st.booleans())
bad_where = st.one_of(
    short_text.filter(lambda w: w not in ("pre", "mid", "post")),
    st.integers(),
    st.none(),
    st.just([]),
    st.lists(
        st.one_of(
            st.sampled_from(["pre", "mid", "post"]),
            st.integers(),
            short_text.filter(lambda w: w not in ("pre", "mid", "post")),
        ),
        min_size=1,
        max_size=3,
    ).filter(lambda v: any(w not in ("pre", "mid", "post") for w in v)),
)
bad_tr = st.one_of(st.integers(), short_text, st.just({"hook_embed": np.zeros(3)}), st.just(object()))
PARTIAL = object()  # stands for the trace that lacks most names


def ap_case(name, strategy, fragment=None):
    return st.tuples(st.just(name), strategy, st.just(fragment or arg(name)))


analysis_cases = st.one_of(
    # logit lens
    case(
        "logit_lens",
        "k",
        st.one_of(st.integers(max_value=0), st.integers(VOCAB + 1, 10**6), st.floats(), short_text, st.booleans()),
    ),
    case("logit_lens", "where", bad_where),
    case("logit_lens", "batch", bad_batch),
    case("logit_lens", "positions", bad_position_list),
    case("logit_lens_logits", "where", bad_where),
    case("logit_lens_logits", "batch", bad_batch),
    # direct logit attribution and the residual decomposition
    case("dla", "answer", bad_token | st.none()),
    st.tuples(
        st.just("dla"),
        st.fixed_dictionaries({"answer": st.just(3), "counterfactual": bad_token}),
        st.just(arg("counterfactual")),
    ),
    st.tuples(
        st.just("dla"),
        st.fixed_dictionaries(
            {
                "answer": st.just(3),
                "position": st.one_of(
                    st.integers(T, 100), st.integers(-100, -T - 1), st.floats(), short_text, st.none()
                ),
            }
        ),
        st.just(arg("position")),
    ),
    st.tuples(st.just("dla"), st.fixed_dictionaries({"answer": st.just(3), "batch": bad_batch}), st.just(arg("batch"))),
    case("decompose", "batch", bad_position_list.filter(lambda v: not isinstance(v, int) or v >= B)),
    case("decompose", "positions", bad_position_list),
    case(
        "frozen",
        "final",
        st.one_of(
            hnp.arrays(np.float32, hnp.array_shapes(max_dims=3, max_side=20).filter(lambda s: s != (HIDDEN,))),
            short_text,
            st.none(),
            st.lists(finite, max_size=3).map(lambda v: [v, v + [1.0]]),
        ),
    ),
    # rotary
    case("rotary_table", "seq_len", st.one_of(bad_positive_int, st.integers(MAX_LEN + 1, 10**12))),
    case(
        "bands",
        "layer",
        st.one_of(st.integers(LAYERS, 99), st.integers(-99, -LAYERS - 1), st.floats(), short_text, st.none()),
    ),
    case(
        "bands",
        "head",
        st.one_of(st.integers(HQ, 99), st.integers(max_value=-HQ - 1), st.floats(), short_text, st.none()),
    ),
    case("bands", "batch", bad_batch),
    case(
        "bands",
        "bands",
        st.one_of(
            st.integers(),
            short_text,
            st.just([]),
            st.just([[]]),
            st.lists(st.one_of(st.integers(PAIRS, 20), st.integers(-20, -1)), min_size=1, max_size=2).map(
                lambda v: [v]
            ),
            st.builds(slice, st.one_of(st.floats(), short_text)).map(lambda s: [s]),
            st.builds(slice, st.integers(PAIRS, 9), st.integers(PAIRS, 12)).map(lambda s: [s]),
            st.just([[[0, 1], [1]]]),
            st.lists(st.floats(0, 1), min_size=1, max_size=2).map(lambda v: [v]),
        ),
    ),
    # heads
    case("head_scores", "seq_len", st.one_of(bad_positive_int, st.integers(MAX_LEN // 2, 10**9))),
    case("head_scores", "num_sequences", bad_positive_int),
    case("head_scores", "seed", st.one_of(st.floats(), short_text, st.none(), st.booleans())),
    case("head_scores", "bos_token", bad_token),
    case("attention_stats", "batch", bad_batch.filter(lambda b: b is not None)),
    case("repeated_tokens", "seq_len", bad_positive_int),
    case("repeated_tokens", "num_sequences", bad_positive_int),
    case("repeated_tokens", "vocabulary_size", bad_positive_int),
    # activation patching: every check comes before anything is traced or compiled
    case("patching", "sites", st.one_of(short_text, st.integers(), st.none())),
    case(
        "patching",
        "clean_ids",
        bad_inputs.filter(lambda v: not isinstance(v, list) or not any(isinstance(x, str) for x in v)),
    ),
    case(
        "patching",
        "corrupted_ids",
        st.one_of(
            out_of_range_ids(),
            int_arrays(st.tuples(st.integers(1, 3), st.integers(1, 8)).filter(lambda s: s != (B, T)), 0, 5),
        ),
    ),
    case("patching", "padding_mask", bad_padding_masks()),
    case("patching", "batch_size", bad_positive_int),
    case(
        "patching", "answer", st.one_of(bad_token, st.lists(st.integers(0, 5), min_size=3, max_size=4), st.just(None))
    ),
    case("patching", "counterfactual", st.one_of(bad_token, st.lists(st.integers(0, 5), min_size=3, max_size=4))),
    st.tuples(
        st.just("patching"),
        st.fixed_dictionaries(
            {
                "metric": st.one_of(st.integers(), short_text, st.lists(st.integers(), max_size=1)),
                "answer": st.just(None),
            }
        ),
        st.just(arg("metric")),
    ),
    # a trace that is not one, or lacks what the analysis reads (a lookup: KeyError)
    st.tuples(
        st.sampled_from(
            ["logit_lens", "logit_lens_logits", "dla", "decompose", "bands", "head_scores", "attention_stats"]
        ),
        st.fixed_dictionaries({"tr": bad_tr}),
        st.just(arg("tr")),
    ),
    st.tuples(
        st.sampled_from(
            ["logit_lens", "logit_lens_logits", "dla", "decompose", "bands", "head_scores_tr", "attention_stats"]
        ),
        st.fixed_dictionaries({"tr": st.just(PARTIAL)}),
        st.just(arg("tr")),
    ),
)


def run_analysis(model, full, partial, which, kwargs):
    kwargs = dict(kwargs)
    given_tr = "tr" in kwargs
    tr = kwargs.pop("tr", full)
    tr = partial if tr is PARTIAL else tr
    if which == "logit_lens":
        return analysis.logit_lens(model, tr, **kwargs)
    if which == "logit_lens_logits":
        return analysis.logit_lens_logits(model, tr, **kwargs)
    if which == "dla":
        return analysis.direct_logit_attribution(model, tr, **{"answer": 3, **kwargs})
    if which == "decompose":
        return analysis.decompose_resid(model, tr, **kwargs)
    if which == "frozen":
        return analysis.frozen_norm_scale(model, **kwargs)
    if which == "rotary_table":
        return analysis.rotary_table(model, **kwargs)
    if which == "bands":
        return analysis.rotary_band_scores(model, tr, **{"layer": 0, "head": 1, **kwargs})
    if which == "head_scores":  # tr=None: the detector's own random sequences
        return analysis.head_scores(model, tr, **kwargs) if given_tr else analysis.head_scores(model, **kwargs)
    if which == "head_scores_tr":
        return analysis.head_scores(model, tr)
    if which == "attention_stats":
        return analysis.attention_stats(tr, **kwargs)
    if which == "repeated_tokens":
        return analysis.repeated_tokens(**{"vocabulary_size": VOCAB, "seq_len": 4, "num_sequences": 2, **kwargs})
    if which == "patching":
        args = {"clean_ids": IDS, "corrupted_ids": IDS[:, ::-1].copy(), "answer": 3, "progress": False, **kwargs}
        return analysis.activation_patching(model, **args)
    raise AssertionError(which)


@pytest.mark.timeout(180)
@fuzz(300)
@given(case=analysis_cases)
def test_analysis(case, model, traces):
    full, partial, _ = traces
    which, kwargs, fragment = case
    errors = (ValueError, TypeError, KeyError) if kwargs.get("tr") is PARTIAL else (ValueError, TypeError)
    before = compiled_count(model)
    expect_bad(lambda: run_analysis(model, full, partial, which, kwargs), fragment, errors=errors)
    assert compiled_count(model) == before


# === phi3lab.generate =======================================================

generate_cases = st.one_of(
    pick("prompt", st.one_of(st.integers(), st.none(), st.lists(st.none(), max_size=2), st.binary(max_size=3))),
    pick("prompt", letters),  # encodes to ids beyond the model's 64-token vocabulary
    pick("max_new_tokens", bad_positive_int),
    pick(
        "temperature",
        st.one_of(
            st.floats(max_value=-1e-9), st.just(math.nan), st.just(math.inf), short_text, st.none(), st.booleans()
        ),
    ),
    pick("seed", st.one_of(st.integers(max_value=-1), st.floats(), short_text, st.none(), st.booleans())),
    pick("chat", st.one_of(st.integers(), short_text, st.none(), floats)),
    pick("tokenizer", st.one_of(st.integers(), st.none(), short_text, st.just(object()))),
)


@pytest.mark.timeout(120)
@fuzz(100)
@given(case=generate_cases)
def test_generate(case, model, tok):
    name, value, fragments = case
    kwargs = {"tokenizer": tok, "prompt": "hello", name: value}
    expect_bad(lambda: phi3lab.generate(model, **kwargs), *fragments)


# === Trace lookups and helpers ==============================================


@pytest.mark.timeout(60)
@fuzz(100)
@given(data=st.data())
def test_trace_result(data, traces):
    full, partial, _ = traces
    kind = data.draw(
        st.sampled_from(
            ["getitem", "attention_layer", "attention_head", "resid_where", "to_pandas_batch", "to_pandas_name"]
        )
    )
    if kind == "getitem":
        name = data.draw(
            st.one_of(st.sampled_from(NAMES), st.text(max_size=12)).filter(lambda n: n not in partial.names)
        )
        expect_bad(lambda: partial[name], repr(name), errors=(KeyError,))
    elif kind == "attention_layer":
        value = data.draw(
            st.one_of(st.integers(LAYERS, 99), st.integers(-99, -LAYERS - 1), st.floats(), short_text, st.none())
        )
        expect_bad(lambda: full.attention(value), arg("layer"))
    elif kind == "attention_head":
        value = data.draw(
            st.one_of(st.integers(HQ, 99), st.integers(-99, -HQ - 1), st.floats(), short_text, st.booleans())
        )
        expect_bad(lambda: full.attention(0, head=value), arg("head"))
    elif kind == "resid_where":
        value = data.draw(
            st.one_of(short_text.filter(lambda w: w not in ("pre", "mid", "post")), st.integers(), st.none())
        )
        expect_bad(lambda: full.resid(0, value), arg("where"))
    elif kind == "to_pandas_batch":
        value = data.draw(bad_batch)
        expect_bad(lambda: full.to_pandas("hook_embed", batch=value), arg("batch"))
    else:
        name = data.draw(st.text(max_size=10).filter(lambda n: n not in full.names))
        expect_bad(lambda: full.to_pandas(name), repr(name), errors=(KeyError,))


# === After the fuzzing ======================================================


@pytest.mark.timeout(120)
def test_failed_calls_leave_model_and_traces_intact():
    """Failed calls of every kind (refused before compiling, or while the
    program is traced: a bad patch source, a wrong hook shape, a hook that
    raises) change neither a model, nor the traces taken before them, nor
    its compiled programs."""
    model = phi3lab.Phi3Backbone(**BASE_KWARGS)
    full = phi3lab.trace(model, IDS)
    partial = phi3lab.trace(model, IDS, names="blocks.0.hook_resid_pre")
    short = phi3lab.trace(model, IDS[:, :4], names="blocks.0.hook_resid_pre")
    before = compiled_count(model)

    def broken(x, ctx):
        raise RuntimeError("a bug in a hook")

    failing = [
        lambda: phi3lab.trace(model, IDS, names="blocks.9.hook_resid_pre"),
        lambda: phi3lab.trace(model, IDS, queries=slice(3, 1)),
        lambda: phi3lab.trace(model, IDS, hooks=H.patch("blocks.0.hook_resid_pre", short)),
        lambda: phi3lab.trace(model, IDS, hooks={"blocks.1.hook_resid_post": lambda x, ctx: x[..., :3]}),
        lambda: phi3lab.trace(model, IDS, hooks={"blocks.0.mlp.hook_post": broken}),
        lambda: phi3lab.estimate(model, MAX_LEN + 1),
        lambda: analysis.logit_lens(model, partial),
        lambda: analysis.activation_patching(model, IDS, IDS[:, :3], answer=3, progress=False),
    ]
    for call in failing:
        with pytest.raises((ValueError, TypeError, KeyError, RuntimeError)):
            call()
    again = phi3lab.trace(model, IDS)
    assert compiled_count(model) == before  # the program compiled before the failures
    assert again.names == full.names
    for name in full.names:
        np.testing.assert_array_equal(again[name], full[name], err_msg=name)
    np.testing.assert_array_equal(partial["blocks.0.hook_resid_pre"], full["blocks.0.hook_resid_pre"])
    table = analysis.logit_lens(model, full, k=2, where="post")
    assert len(table) == LAYERS * T
