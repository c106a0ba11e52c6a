"""`phi3lab.activations`: corpus collection and activation stores.

Oracles: `phi3lab.trace` of each document alone (every stored row is the
same position of it), the documents' own ids (tags), NumPy over the whole
array (means, batches), and the in-memory store for the on-disk one (bit for
bit, in a fresh process, after a SIGKILL and a resume, and on 8 simulated
devices).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import phi3lab
from conftest import random_backbone
from phi3lab.activations import collect
from phi3lab.runtime import compile_cache
from phi3lab.tracing.tracer import padded_length

ROOT = str(Path(__file__).resolve().parents[1])
# Short and long rotary factors (pretraining length 8) and buckets 64, 128, 256.
MAX_POSITIONS = 256
LENGTHS = (3, 8, 9, 40, 64, 65, 100, 130, 5, 12)
SHORT = (3, 8, 9, 40, 5, 12)  # buckets of 64 tokens only (short and long rotary factors)
SITES = ["blocks.0.hook_resid_post", "blocks.1.attn.hook_z", "blocks.0.mlp.hook_post", "hook_logits"]


def model_of(seed: int = 0):
    return random_backbone(seed, scale=0.1, max_sequence_length=MAX_POSITIONS)


def corpus(lengths=LENGTHS, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 96, n).astype(np.int32) for n in lengths]


@pytest.fixture(scope="module")
def model():
    return model_of()


@pytest.fixture(scope="module")
def traces(model):
    """`phi3lab.trace` of each document of `corpus()` alone, every site the tests store."""
    names = [*SITES, "blocks.1.hook_resid_post"]
    return [phi3lab.trace(model, ids, names=names) for ids in corpus()]


def assert_rows_equal(store, docs, expected, names, positions=None):
    """Every document's rows equal its positions in `expected[doc]` (its
    trace alone) within 1e-5 of the activation's scale, tagged with their
    position and token id."""
    doc, position, token_id = (store.tag(t) for t in phi3lab.activations.TAGS)
    for index, ids in enumerate(docs):
        rows = np.flatnonzero(doc == index)
        kept = np.arange(len(ids)) if positions is None else np.asarray(positions(ids), int)
        np.testing.assert_array_equal(position[rows], kept)
        np.testing.assert_array_equal(token_id[rows], ids[kept])
        for name in names:
            reference = expected[index][name][0][kept]
            scale = max([1.0, *np.abs(reference).ravel()])
            assert np.abs(np.asarray(store[name][rows]) - reference).max(initial=0) <= 1e-5 * scale, (name, index)


@pytest.mark.parametrize("batch_size", [1, 7])
def test_rows_equal_trace_of_each_document_alone(model, traces, batch_size):
    docs = corpus()
    before = compile_cache.size(model, "collect")
    store = collect(model, docs, SITES, batch_size=batch_size, progress=False, window=6)
    assert len(store) == sum(LENGTHS)  # real tokens only: no padding row
    assert store.documents == len(docs) and store.complete
    assert_rows_equal(store, docs, traces, SITES)
    buckets = {padded_length(model, n) for n in LENGTHS}
    assert len(buckets) == 4  # 64 (short rotary factors), 64 (long), 128 and 256, as trace runs them
    assert compile_cache.size(model, "collect") - before <= len(buckets)


def test_last_and_chosen_positions(model, traces):
    docs = corpus()
    last = collect(model, docs, SITES, positions="last", batch_size=7, progress=False)
    assert len(last) == len(docs)
    assert_rows_equal(last, docs, traces, SITES[:2], positions=lambda ids: [len(ids) - 1])
    even = lambda ids: ids % 2 == 0
    chosen = collect(model, docs, SITES, positions=even, batch_size=7, progress=False)
    assert len(chosen) == sum(int(even(ids).sum()) for ids in docs)
    assert_rows_equal(chosen, docs, traces, SITES[:2], positions=lambda ids: np.flatnonzero(even(ids)))


def test_hooks_run_as_in_trace(model):
    docs = corpus((5, 9, 20))
    vector = np.random.default_rng(1).standard_normal(model.hidden_dim).astype(np.float32)
    hooks = phi3lab.hooks.add("blocks.0.hook_resid_post", vector) | phi3lab.hooks.ablate_heads(1, [0, 3])
    names = ["blocks.1.hook_resid_mid", "hook_logits"]
    store = collect(model, docs, names, hooks=hooks, batch_size=2, progress=False)
    assert_rows_equal(store, docs, [phi3lab.trace(model, ids, names=names, hooks=hooks) for ids in docs], names)
    plain = collect(model, docs, names, batch_size=2, progress=False)
    assert np.abs(plain["hook_logits"] - store["hook_logits"]).max() > 1e-2  # the hooks did act


def test_texts_datasets_and_streams_tagged_by_the_tokenizer(shipped_model, shipped_tokenizer):
    import datasets

    model, tok = shipped_model, shipped_tokenizer
    texts = ["When Mary and John went to the store", "red blue green", "Anna gave a book to Tom", "hi"] * 3
    store = collect(model, texts, "blocks.0.hook_resid_post", tokenizer=tok, batch_size=4, progress=False)
    tokens = store.tokens
    for index, text in enumerate(texts):
        ids = tok.encode(text)
        part = tokens[tokens["doc"] == index]
        assert part["position"].tolist() == list(range(len(ids)))
        assert part["token_id"].tolist() == ids
        assert part["token"].tolist() == tok.display_tokens(ids)
    from_dataset = collect(
        model, datasets.Dataset.from_dict({"text": texts}), "blocks.0.hook_resid_post", tokenizer=tok, progress=False
    )
    streamed = collect(model, iter(texts), "blocks.0.hook_resid_post", tokenizer=tok, batch_size=4, progress=False)
    for other in (from_dataset, streamed):
        for index in range(len(texts)):
            np.testing.assert_allclose(
                other["blocks.0.hook_resid_post"][other.rows_of(index)],
                store["blocks.0.hook_resid_post"][store.rows_of(index)],
                atol=1e-5,
            )
    ids = collect(model, [tok.encode(t) for t in texts], "blocks.0.hook_resid_post", max_length=3, progress=False)
    assert len(ids) == sum(min(3, len(tok.encode(t))) for t in texts)


def test_store_mean_batches_and_size_check(model):
    store = collect(model, corpus(SHORT * 4), "blocks.1.hook_resid_post", progress=False)  # batch size from memory
    rows = store["blocks.1.hook_resid_post"]
    np.testing.assert_allclose(store.mean("blocks.1.hook_resid_post"), rows.astype(np.float64).mean(0), atol=1e-6)
    seen = list(store.batches("blocks.1.hook_resid_post", 16, seed=3))
    assert [len(b) for b in seen[:-1]] == [16] * (len(seen) - 1) and len(seen[-1]) <= 16
    both = np.concatenate(seen)
    order = np.lexsort(both.T)
    np.testing.assert_array_equal(both[order], rows[np.lexsort(rows.T)])  # every row once
    assert not np.array_equal(both, rows)  # shuffled
    np.testing.assert_array_equal(np.concatenate(list(store.batches("blocks.1.hook_resid_post", 16, False))), rows)
    with pytest.raises(ValueError, match="max_bytes"):
        store.to_numpy("blocks.1.hook_resid_post", max_bytes=1000)
    with pytest.raises(ValueError, match="holds no activations named 'blocks.1.hook_resid_pre'"):
        store["blocks.1.hook_resid_pre"]


# A subprocess: open the store at argv[1] and save its arrays and tags to argv[2].
DUMP = """
import sys, numpy as np, phi3lab
store = phi3lab.activations.open(sys.argv[1])
arrays = {name: np.asarray(store[name]) for name in store.names}
arrays.update({tag: store.tag(tag) for tag in phi3lab.activations.TAGS})
np.savez(sys.argv[2], **arrays)
"""


def run_python(code: str, *args, env=None, **kwargs):
    environment = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT}/tests", **(env or {}))
    return subprocess.run(
        [sys.executable, "-c", code, *args], env=environment, cwd=ROOT, capture_output=True, text=True, **kwargs
    )


def arrays_of(store) -> dict:
    """Every array and tag of `store`, read whole."""
    return {name: np.asarray(store[name]) for name in store.names} | {t: store.tag(t) for t in phi3lab.activations.TAGS}


def assert_same_store(arrays, store):
    for name in [*store.names, *phi3lab.activations.TAGS]:
        expected = store[name] if name in store.names else store.tag(name)
        assert arrays[name].dtype == np.asarray(expected).dtype, name
        np.testing.assert_array_equal(arrays[name], expected, err_msg=name)


@pytest.mark.slow
def test_disk_store_reopened_in_a_fresh_process_equals_memory(model, tmp_path):
    docs = corpus(SHORT)
    names = ["blocks.0.hook_resid_post", "blocks.1.attn.hook_z"]
    memory = collect(model, docs, names, batch_size=3, dtype="float16", progress=False)
    disk = collect(model, docs, names, batch_size=3, dtype="float16", progress=False, store=tmp_path / "acts")
    assert disk.complete and len(disk) == len(memory)
    done = run_python(DUMP, str(tmp_path / "acts"), str(tmp_path / "dump.npz"), timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_store(np.load(tmp_path / "dump.npz"), memory)
    assert_same_store(arrays_of(disk), memory)


def test_bfloat16_rows_are_the_float32_rows_rounded_in_memory_and_on_disk(model, tmp_path):
    import ml_dtypes

    docs, name = corpus(SHORT[:3]), "blocks.1.hook_resid_post"
    exact = collect(model, docs, name, batch_size=2, progress=False)
    rounded = np.asarray(exact[name]).astype(ml_dtypes.bfloat16)
    memory = collect(model, docs, name, batch_size=2, dtype="bfloat16", progress=False)
    disk = collect(model, docs, name, batch_size=2, dtype="bfloat16", progress=False, store=tmp_path / "bf16")
    for store in (memory, disk, phi3lab.activations.open(tmp_path / "bf16")):
        assert store[name].dtype == np.dtype(ml_dtypes.bfloat16)
        np.testing.assert_array_equal(np.asarray(store[name]).view(np.uint16), rounded.view(np.uint16))
        np.testing.assert_array_equal(store[name][[4, 1]].view(np.uint16), rounded[[4, 1]].view(np.uint16))
        np.testing.assert_allclose(store.mean(name), rounded.astype(np.float64).mean(0), rtol=1e-6, atol=1e-6)
        assert sum(len(b) for b in store.batches(name, 5)) == len(rounded)
    # Half the bytes of float32 on disk: Zarr holds 16 bits per value.
    import zarr

    assert zarr.open_array(tmp_path / "bf16" / name, mode="r").dtype.itemsize == 2


def test_store_errors(model, tmp_path):
    docs = corpus(SHORT[:2])
    collect(model, docs, "blocks.0.hook_resid_post", progress=False, store=tmp_path / "acts")
    with pytest.raises(ValueError, match="another model"):
        phi3lab.activations.open(tmp_path / "acts", model=random_backbone(0, num_layers=3))
    with pytest.raises(ValueError, match="another model"):
        phi3lab.activations.open(tmp_path / "acts", model=model_of(seed=1))  # same configuration, other weights
    phi3lab.activations.open(tmp_path / "acts", model=model)  # its own model is fine
    with pytest.raises(ValueError, match="`store` must be a path where no store exists yet"):
        collect(model, docs, "blocks.0.hook_resid_post", progress=False, store=tmp_path / "acts")
    with pytest.raises(ValueError, match="another names"):
        collect(model, docs, "blocks.1.hook_resid_post", progress=False, store=tmp_path / "acts", resume=True)
    with pytest.raises(ValueError, match="another model"):
        other = random_backbone(0, num_layers=3)
        collect(other, docs, "blocks.0.hook_resid_post", progress=False, store=tmp_path / "acts", resume=True)
    with pytest.raises(ValueError, match="`path` must be the directory of an activation store"):
        phi3lab.activations.open(tmp_path / "nothing")


# A writer killed mid-run: collect the corpus of `corpus(LENGTHS * 6)` into
# argv[1], reading documents slowly and printing each index as it is read.
WRITER = """
import sys, time
import numpy as np
from test_activations import LENGTHS, corpus, model_of
from phi3lab.activations import collect

def slow(docs):
    for index, ids in enumerate(docs):
        print(index, flush=True)
        time.sleep(0.02)
        yield ids

collect(model_of(), slow(corpus(LENGTHS * 6)), ["blocks.0.hook_resid_post", "hook_logits"], batch_size=2,
        window=10, progress=False, store=sys.argv[1])
print("done", flush=True)
"""


@pytest.mark.slow
def test_killed_writer_leaves_whole_documents_and_resume_completes(tmp_path):
    path = tmp_path / "acts"
    environment = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT}/tests")
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path)], env=environment, cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    try:
        for line in writer.stdout:  # documents of the third window are being read: two windows are written
            if line.strip() == "25":
                break
        time.sleep(0.03)
        writer.send_signal(signal.SIGKILL)
    finally:
        writer.wait(timeout=60)
    assert writer.returncode == -signal.SIGKILL
    docs = corpus(LENGTHS * 6)
    names = ["blocks.0.hook_resid_post", "hook_logits"]
    partial = phi3lab.activations.open(path)
    assert not partial.complete and 0 < partial.documents < len(docs)
    assert "incomplete" in repr(partial)
    held = np.unique(partial.tag("doc"))
    assert len(held) == partial.documents
    for index in held:  # whole documents only
        np.testing.assert_array_equal(partial.tag("position")[partial.rows_of(index)], np.arange(len(docs[index])))
    model = model_of()  # as the writer's
    resumed = collect(model, docs, names, batch_size=2, window=10, progress=False, store=path, resume=True)
    uninterrupted = collect(model, docs, names, batch_size=2, window=10, progress=False)
    assert resumed.complete and resumed.documents == len(docs)
    assert_same_store(arrays_of(resumed), uninterrupted)


# 8 simulated devices: collect and save the rows to argv[1].
EIGHT_DEVICES = """
import sys, jax, numpy as np
from test_activations import corpus, model_of
from phi3lab.activations import collect
assert len(jax.devices()) == 8, jax.devices()
store = collect(model_of(), corpus(), ["blocks.1.hook_resid_post", "hook_logits"], batch_size=3, progress=False)
np.savez(sys.argv[1], doc=store.tag("doc"), position=store.tag("position"), resid=store["blocks.1.hook_resid_post"],
         logits=store["hook_logits"])
"""


@pytest.mark.slow
def test_eight_devices_give_the_rows_of_one(tmp_path):
    done = run_python(
        EIGHT_DEVICES,
        str(tmp_path / "rows.npz"),
        env={"XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"},
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    eight = np.load(tmp_path / "rows.npz")
    one = collect(model_of(), corpus(), ["blocks.1.hook_resid_post", "hook_logits"], batch_size=3, progress=False)
    order = np.lexsort((one.tag("position"), one.tag("doc")))
    order8 = np.lexsort((eight["position"], eight["doc"]))
    np.testing.assert_array_equal(eight["doc"][order8], one.tag("doc")[order])
    np.testing.assert_array_equal(eight["position"][order8], one.tag("position")[order])
    np.testing.assert_allclose(eight["resid"][order8], one["blocks.1.hook_resid_post"][order], atol=1e-5)
    np.testing.assert_allclose(eight["logits"][order8], one["hook_logits"][order], atol=1e-5)


def test_bad_input_names_the_argument(model):
    docs = corpus(LENGTHS[:3])
    site = "blocks.0.hook_resid_post"
    with pytest.raises(ValueError, match="`data` must be a corpus of at least one document"):
        collect(model, [], site, progress=False)
    with pytest.raises(ValueError, match=r"`tokenizer` must be a Phi3Tokenizer when `data` holds text \(data\[0\]\)"):
        collect(model, ["some text"], site, progress=False)
    with pytest.raises(ValueError, match=r"`data\[1\]` must be token ids in \[0, 96\) .*out of range: \[96\]"):
        collect(model, [docs[0], np.array([1, 96])], site, progress=False)
    with pytest.raises(ValueError, match=r"`data\[0\]` must be a non-empty text"):
        collect(model, [[]], site, progress=False)
    with pytest.raises(ValueError, match=r"`data\[0\]` must be at most max_sequence_length=256"):
        collect(model, [np.zeros(300, int)], site, progress=False)
    with pytest.raises(ValueError, match="`positions` must be a function .* returned an array of shape \\(2,\\)"):
        collect(model, docs, site, positions=lambda ids: np.ones(2, bool), progress=False)
    with pytest.raises(ValueError, match="`positions` must be"):
        collect(model, docs, site, positions="first", progress=False)
    with pytest.raises(ValueError, match="`memory_budget` must be enough for one batch of 1 x 64 tokens"):
        collect(model, docs, site, memory_budget=1000, progress=False)
    with pytest.raises(ValueError, match="`memory_budget` must be enough for one batch of 4 x 64"):
        collect(model, docs, site, batch_size=4, memory_budget=1000, progress=False)
    with pytest.raises(ValueError, match="`names` must be hook sites with one row per token"):
        collect(model, docs, "blocks.0.attn.hook_pattern", progress=False)
    with pytest.raises(ValueError, match="`names` entry 'blocks.0.hook_resid' matches no hook name"):
        collect(model, docs, "blocks.0.hook_resid", progress=False)
    with pytest.raises(ValueError, match="`dtype` must be one of"):
        collect(model, docs, site, dtype="int8", progress=False)
    with pytest.raises(ValueError, match="`resume` must be False when `store` is None"):
        collect(model, docs, site, resume=True, progress=False)
    with pytest.raises(TypeError, match="`batch_size` must be a positive integer"):
        collect(model, docs, site, batch_size=2.5, progress=False)
