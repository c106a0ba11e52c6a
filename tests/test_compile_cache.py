"""The bounded compile cache holds every program phi3lab compiles: those of
a model in the model's cache, those of no model (rotary tables, int8
quantization, the initializers' draws) in one process-wide cache, each
bounded by `compile_cache.limit()`. (Only the compile cache calls `jax.jit`:
tests/test_layout.py.)"""

from __future__ import annotations

import jax
import numpy as np
import pytest

import phi3lab
from conftest import random_backbone
from phi3lab.model.rotary import RotarySpec
from phi3lab.runtime import compile_cache
from phi3lab.tracing.rope import describe_rotary


def kinds(model) -> list:
    return [key[0] for key in compile_cache.entries(model)]


@pytest.fixture
def limit_of_three():
    before = compile_cache.limit()
    compile_cache.set_limit(3)
    yield
    compile_cache.set_limit(before)


def test_rotary_tables_compile_per_bucket_within_the_limit(limit_of_three):
    spec = RotarySpec(8, 10_000.0, None, None, None, 2048, 2048)
    first = describe_rotary(spec, 5)
    programs = compile_cache.size(None, "rope.tables")
    same_bucket = describe_rotary(spec, 40)  # padded to 64 as well: no new program
    assert compile_cache.size(None, "rope.tables") == programs
    np.testing.assert_array_equal(same_bucket.cos[:5], first.cos)
    for length in (70, 130, 300, 400, 600):  # buckets 128, 256, 384, 512, 1024
        describe_rotary(spec, length)
        assert compile_cache.size(None, "rope.tables") <= 3
    again = describe_rotary(spec, 5)  # dropped, compiled again: the same values
    np.testing.assert_array_equal(again.cos, first.cos)
    np.testing.assert_array_equal(again.sin, first.sin)
    # The NumPy formula: cos(position * 10000 ** (-2i / 8)), each pair's angle on both halves.
    angles = np.arange(5)[:, None] * 10_000.0 ** (-np.arange(0, 8, 2) / 8)
    np.testing.assert_allclose(first.cos, np.cos(np.concatenate([angles, angles], axis=1)), rtol=1e-6, atol=1e-6)


def test_set_limit_trims_the_process_wide_cache():
    describe_rotary(RotarySpec(4, 100.0, None, None, None, 8, 8), 3)
    before = compile_cache.limit()
    try:
        compile_cache.set_limit(1)
        assert compile_cache.size(None) == 1
    finally:
        compile_cache.set_limit(before)


def test_quantization_compiles_once_per_kernel_shape_for_every_model():
    first, second = random_backbone(seed=1), random_backbone(seed=2)
    first.quantize("int8")
    programs = compile_cache.size(None, "quantize_int8")
    assert programs >= 1
    second.quantize("int8")  # same shapes: no new program
    assert compile_cache.size(None, "quantize_int8") == programs


LOWERED = "/jax/core/compile/jaxpr_to_mlir_module_duration"  # JAX's event per program lowered for XLA


def programs_lowered_while_saving(model, directory) -> int:
    """How many programs JAX lowers (and compiles, unless its disk cache
    has them) while `model` is saved in the Hugging Face layout."""
    from phi3lab.presets.hf_format import save_checkpoint

    events = []
    listener = lambda event, seconds, **kwargs: events.append(event)
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        save_checkpoint(model, directory)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    return events.count(LOWERED)


def test_saving_compiles_the_same_programs_for_any_number_of_layers(tmp_path):
    """qkv, o, gate_up, down and the LM head have one function each in the
    model's cache, and the norms share one layer slice; the layer index is
    an input, so a deeper model compiles nothing more."""
    model = random_backbone(seed=3, num_layers=2)
    shallow = programs_lowered_while_saving(model, tmp_path / "shallow")
    exports = [key for key in compile_cache.entries(model) if key[0] in ("export", "stacked.layer_slice")]
    assert len(exports) == 6
    # At most one per function (JAX reuses what it lowered for another model
    # of these shapes earlier in the process, so possibly none); one per
    # layer would be over 20.
    deep = programs_lowered_while_saving(random_backbone(seed=4, num_layers=5), tmp_path / "deep")
    assert shallow <= 6 and deep <= 6
    reloaded = phi3lab.Phi3Backbone.from_preset(str(tmp_path / "shallow"))
    for saved, loaded in zip(jax.tree.leaves(model.params()), jax.tree.leaves(reloaded.params())):
        np.testing.assert_array_equal(np.asarray(saved), np.asarray(loaded))


def test_a_model_can_be_built_inside_eval_shape():
    """The initializers' draws are traceable programs: sizing a model under
    `jax.eval_shape` draws nothing (tests/test_scale.py does it at real size)."""

    def build():
        return phi3lab.Phi3Backbone(
            vocabulary_size=64,
            num_layers=2,
            hidden_dim=16,
            intermediate_dim=32,
            num_query_heads=2,
            num_key_value_heads=1,
        ).params()

    shapes = jax.eval_shape(build)
    assert shapes["decoder"]["mlp"]["gate_kernel"].shape == (2, 16, 32)
    assert compile_cache.size(None, "init.normal") >= 1
