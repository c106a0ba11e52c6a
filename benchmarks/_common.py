"""What the benchmarks share: the 12-layer width-768 configuration, its
models (random weights, or keras-hub's with the same weights), interleaved
median timings and the printed header and ratio rows.

The scripts run as `python benchmarks/X.py`, so this folder is on `sys.path`
and they import it as `_common`. Heavy imports (jax, keras, keras-hub,
phi3lab) happen inside the functions, after a script has parsed its
arguments, so `--help` answers at once.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time

os.environ.setdefault("KERAS_BACKEND", "jax")

# 12 layers, width 768, 12 heads, MLP 2048, vocabulary 32064: the size of
# every benchmark's model unless its arguments say otherwise.
CONFIG = {
    "vocabulary_size": 32064,
    "num_layers": 12,
    "hidden_dim": 768,
    "intermediate_dim": 2048,
    "num_query_heads": 12,
    "num_key_value_heads": 12,
    "max_sequence_length": 4096,
    "pretraining_sequence_length": 4096,
}


def add_size_arguments(parser, kv_heads: bool = True) -> None:
    """`--layers --hidden --heads [--kv-heads] --intermediate --vocabulary`, defaulting to `CONFIG`."""
    parser.add_argument("--layers", type=int, default=CONFIG["num_layers"])
    parser.add_argument("--hidden", type=int, default=CONFIG["hidden_dim"])
    parser.add_argument("--heads", type=int, default=CONFIG["num_query_heads"])
    if kv_heads:
        parser.add_argument("--kv-heads", type=int, default=CONFIG["num_key_value_heads"])
    parser.add_argument("--intermediate", type=int, default=CONFIG["intermediate_dim"])
    parser.add_argument("--vocabulary", type=int, default=CONFIG["vocabulary_size"])


def config_from_arguments(args, max_sequence_length: int = 4096, dtype: str = "float32") -> dict:
    """Constructor arguments (phi3lab's and keras-hub's) from `add_size_arguments`' options."""
    return dict(
        vocabulary_size=args.vocabulary,
        num_layers=args.layers,
        hidden_dim=args.hidden,
        intermediate_dim=args.intermediate,
        num_query_heads=args.heads,
        num_key_value_heads=getattr(args, "kv_heads", args.heads),
        max_sequence_length=max_sequence_length,
        dtype=dtype,
    )


def describe_sizes(args) -> str:
    heads = f"{args.heads}/{args.kv_heads}" if hasattr(args, "kv_heads") else f"{args.heads}"
    return (
        f"layers={args.layers} hidden={args.hidden} heads={heads} intermediate={args.intermediate} "
        f"vocabulary={args.vocabulary}"
    )


def random_model(config: dict | None = None, seed: int = 0):
    """A phi3lab `Phi3Backbone(**config)` (default `CONFIG`) with N(0, 0.02)
    weights (keras-hub's initialization), norm scales 1 + N(0, 0.02)."""
    import numpy as np

    import phi3lab
    from phi3lab.model.initializers import zero_initialization

    with zero_initialization():  # keras' random initializers compile per shape: slow
        model = phi3lab.Phi3Backbone(**(config or CONFIG))
    rng = np.random.default_rng(seed)
    for variable in model.weights:
        noise = 0.02 * rng.standard_normal(tuple(variable.shape), dtype=np.float32)
        variable.assign(1.0 + noise if variable.path.endswith("scale") else noise)
    return model


def keras_hub_pair(config: dict, seed: int = 0):
    """(keras-hub `Phi3Backbone(**config)` with seeded random weights, the
    phi3lab model loaded from the preset keras-hub writes of it)."""
    import keras
    import keras_hub

    import phi3lab

    keras.utils.set_random_seed(seed)
    reference = keras_hub.models.Phi3Backbone(**config)
    with tempfile.TemporaryDirectory() as directory:
        reference.save_to_preset(directory)
        model = phi3lab.Phi3Backbone.from_preset(directory)
    return reference, model


def jitted_forwards(model, reference):
    """`ours(ids, mask)` and `theirs(ids, mask)`: the final hidden states of
    phi3lab (`jax.jit` of its pure `apply`) and of keras-hub (`jax.jit` of
    `stateless_call` with its variables as inputs)."""
    import jax

    params = model.params()
    apply = jax.jit(lambda p, ids, mask: model.apply(p, ids, mask)[0])
    trainable = [v.value for v in reference.trainable_variables]
    non_trainable = [v.value for v in reference.non_trainable_variables]
    call = jax.jit(lambda t, n, x: reference.stateless_call(t, n, x)[0])
    ours = lambda ids, mask: apply(params, ids, mask)
    theirs = lambda ids, mask: call(trainable, non_trainable, {"token_ids": ids, "padding_mask": mask})
    return ours, theirs


def generation_runners(backbone, model, prompt, new_tokens: int) -> dict:
    """Greedy generation of `new_tokens` after the token ids `prompt` (no
    stop token), as no-argument callables returning the new token ids:
    phi3lab's `generate` (`model`), the same capturing every layer's
    attention pattern, and keras-hub's `Phi3CausalLM.generate` on
    `backbone` (the keras-hub model with the same weights)."""
    import keras_hub
    import numpy as np

    import phi3lab

    causal_lm = keras_hub.models.Phi3CausalLM(backbone=backbone, preprocessor=None)
    causal_lm.compile(sampler="greedy")
    total = len(prompt) + new_tokens
    hub_inputs = {"token_ids": np.zeros((1, total), "int32"), "padding_mask": np.zeros((1, total), "int32")}
    hub_inputs["token_ids"][0, : len(prompt)] = prompt
    hub_inputs["padding_mask"][0, : len(prompt)] = 1
    patterns = "blocks.*.attn.hook_pattern"
    return {
        "phi3lab": lambda: phi3lab.generate(model, prompt, max_new_tokens=new_tokens, stop=[]).new_token_ids,
        "phi3lab + all patterns": lambda: (
            phi3lab.generate(model, prompt, max_new_tokens=new_tokens, stop=[], names=patterns).new_token_ids
        ),
        "keras-hub": lambda: causal_lm.generate(hub_inputs, stop_token_ids=None)["token_ids"][0, len(prompt) :],
    }


def median_times(variants: dict, repeats: int, warmup: int = 2) -> dict:
    """Median seconds of each no-argument callable in `variants`, run in
    interleaved rounds (every other round in reverse order, so that load
    drifting during the run hits all alike) after `warmup` untimed rounds."""
    times = {name: [] for name in variants}
    for round_ in range(warmup + repeats):
        names = list(variants) if round_ % 2 == 0 else list(variants)[::-1]
        for name in names:
            start = time.perf_counter()
            variants[name]()
            if round_ >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def machine() -> str:
    """The devices JAX uses, the CPU count and the load average."""
    import jax

    device = jax.devices()[0]
    return (
        f"jax {jax.__version__} on {device.platform} {device.device_kind} ({len(jax.devices())} visible), "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} (on a shared machine absolute times are noisy)"
    )


def print_ratio_rows(times: dict, base: str, width: int = 28) -> None:
    """A table of milliseconds per variant and its ratio to `times[base]`."""
    print(f"{'variant':{width}s} {'ms':>9s} {'x ' + base:>{max(8, len(base) + 2)}s}")
    for name, seconds in times.items():
        print(f"{name:{width}s} {seconds * 1e3:9.2f} {seconds / times[base]:{max(8, len(base) + 2)}.2f}")
