"""`compare_with_transformers`: phi3lab's activations against transformers'.

Runs the same token ids through a `Phi3Backbone` (with `phi3lab.trace`) and
through transformers' eager `Phi3ForCausalLM` (with torch forward hooks on
the matching modules) and tabulates, per hook site, how far apart they are.
It is how a user checks a new checkpoint before trusting an analysis.
Needs the `oracle` extra: `pip install "phi3lab[oracle]"` (torch and
transformers), imported only when the function is called.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import pandas as pd

from phi3lab.errors import bad_argument
from phi3lab.tracing.names import all_names, select, split_name

# Not reported: transformers' eager attention never exposes the scores
# before the softmax.
UNCOMPARED = ("attn.hook_attn_scores",)


def _import_oracle():
    try:
        import torch
        import transformers
    except ImportError as error:
        raise ImportError(
            f"compare_with_transformers needs torch and transformers ({error}); install them with "
            "pip install 'phi3lab[oracle]'."
        ) from None
    return torch, transformers


def _reference_model(hf_model_or_dir, torch, transformers):
    """A float32 eager `Phi3ForCausalLM` in eval mode."""
    if isinstance(hf_model_or_dir, (str, Path)):
        if not Path(hf_model_or_dir).is_dir():
            raise bad_argument(
                "hf_model_or_dir", hf_model_or_dir, "a transformers Phi-3 model or a local checkpoint directory"
            )
        return transformers.AutoModelForCausalLM.from_pretrained(
            str(hf_model_or_dir), dtype=torch.float32, attn_implementation="eager"
        ).eval()
    if (
        not isinstance(hf_model_or_dir, torch.nn.Module)
        or getattr(getattr(hf_model_or_dir, "config", None), "model_type", None) != "phi3"
    ):
        raise bad_argument(
            "hf_model_or_dir",
            hf_model_or_dir,
            "a transformers Phi-3 model (model_type 'phi3') or a local checkpoint directory",
        )
    model = hf_model_or_dir.eval()
    if model.config._attn_implementation != "eager":
        model.set_attn_implementation("eager")  # patterns come from the eager path only
    return model


@contextlib.contextmanager
def _hf_captures(model, torch):
    """Record transformers' activations under phi3lab's hook names."""
    from transformers.models.phi3 import modeling_phi3

    captured: dict[str, np.ndarray] = {}
    config = model.config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = config.hidden_size // heads
    as_numpy = lambda t: t.detach().to(torch.float32).cpu().numpy()
    handles, rotary_calls = [], []

    def put(name, value):
        captured[name] = as_numpy(value)

    def output_of(module, name, transform=lambda x: x):
        handles.append(module.register_forward_hook(lambda m, args, out: put(name, transform(out))))

    def input_of(module, name):
        def hook(m, args, kwargs):
            put(name, args[0] if args else kwargs["hidden_states"])

        handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))

    def split_qkv(layer):
        def hook(m, args, out):
            batch, length = out.shape[:2]
            q, k, v = out.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
            put(f"blocks.{layer}.attn.hook_q", q.reshape(batch, length, heads, head_dim))
            put(f"blocks.{layer}.attn.hook_k", k.reshape(batch, length, kv_heads, head_dim))
            put(f"blocks.{layer}.attn.hook_v", v.reshape(batch, length, kv_heads, head_dim))

        return hook

    def split_gate_up(layer):
        def hook(m, args, out):
            gate, up = out.chunk(2, dim=-1)
            put(f"blocks.{layer}.mlp.hook_pre", gate)
            put(f"blocks.{layer}.mlp.hook_pre_linear", up)

        return hook

    decoder = model.model
    output_of(decoder.embed_tokens, "hook_embed")
    for i, layer in enumerate(decoder.layers):
        block = f"blocks.{i}."
        input_of(layer, block + "hook_resid_pre")
        output_of(layer.input_layernorm, block + "ln1.hook_normalized")
        handles.append(layer.self_attn.qkv_proj.register_forward_hook(split_qkv(i)))
        output_of(layer.self_attn, block + "attn.hook_pattern", lambda out: out[1])
        input_of(layer.self_attn.o_proj, block + "attn.hook_z")
        output_of(layer.self_attn.o_proj, block + "hook_attn_out")
        input_of(layer.post_attention_layernorm, block + "hook_resid_mid")
        output_of(layer.post_attention_layernorm, block + "ln2.hook_normalized")
        handles.append(layer.mlp.gate_up_proj.register_forward_hook(split_gate_up(i)))
        input_of(layer.mlp.down_proj, block + "mlp.hook_post")
        output_of(layer.mlp, block + "hook_mlp_out")
        output_of(layer, block + "hook_resid_post", lambda out: out[0] if isinstance(out, tuple) else out)
    output_of(decoder.norm, "ln_final.hook_normalized")
    output_of(model.lm_head, "hook_logits")

    original = modeling_phi3.apply_rotary_pos_emb

    def recording_rotary(q, k, cos, sin, *args, **kwargs):
        q_rot, k_rot = original(q, k, cos, sin, *args, **kwargs)
        layer = len(rotary_calls)
        rotary_calls.append(layer)
        put(f"blocks.{layer}.attn.hook_rot_q", q_rot.transpose(1, 2))
        put(f"blocks.{layer}.attn.hook_rot_k", k_rot.transpose(1, 2))
        return q_rot, k_rot

    modeling_phi3.apply_rotary_pos_emb = recording_rotary
    try:
        yield captured
    finally:
        modeling_phi3.apply_rotary_pos_emb = original
        for handle in handles:
            handle.remove()


def _real_rows(name: str, value: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The entries at real (unpadded) positions: query rows of patterns
    (whose padded keys are 0 in both), token rows elsewhere."""
    _, site = split_name(name)
    if site == "attn.hook_pattern":
        return np.moveaxis(value, 1, 2)[mask]  # [B, T, Hq, T] -> rows of real queries
    return value[mask]


def compare_with_transformers(
    model,
    hf_model_or_dir,
    inputs,
    names=None,
    tokenizer=None,
    atol: float = 1e-4,
    *,
    rtol: float = 1e-5,
    padding_mask=None,
) -> pd.DataFrame:
    """Compare every hook site of `model` with transformers' Phi-3 on the same input.

    Runs `inputs` through `model` (`phi3lab.trace`) and through
    transformers' eager `Phi3ForCausalLM` in float32 (torch CPU), captures
    the same activations from both (embeddings; per layer the residual
    streams, norms, q/k/v, rotated q/k, attention pattern, z, attention
    output, MLP activations and output; the final norm and the logits) and
    reports their differences over the real (unpadded) positions.
    `attn.hook_attn_scores` is not compared (transformers' eager attention
    does not expose it). Compare a float32 `model` for a meaningful
    tolerance; a bfloat16 or int8 model shows its own rounding.

    Args:
        model: a `Phi3Backbone`.
        hf_model_or_dir: a transformers Phi-3 model (switched to eager
            attention) or a local Hugging Face checkpoint directory (loaded
            in float32, eager).
        inputs: token ids `[B, T]` (or `[T]`), or text / a list of texts
            with `tokenizer`, as `phi3lab.trace` accepts them.
        names: which hook sites to compare (a name, glob, list or predicate
            as in `phi3lab.trace`); default all.
        tokenizer: a `Phi3Tokenizer`, needed for text inputs.
        atol: float. A site passes when its max absolute difference is at
            most `atol + rtol * reference_max_abs`. Defaults to `1e-4`.
        rtol: float. The tolerance relative to the site's largest reference
            value (residual streams grow with depth). Defaults to `1e-5`.
        padding_mask: `[B, T]` mask for token-id inputs (1 for real tokens),
            passed to both models.

    Returns:
        A DataFrame, one row per site in forward order, with columns
        `name`, `layer` (None for model-level sites), `shape`,
        `max_abs_diff`, `max_rel_diff` (max |diff| / max |reference|),
        `reference_max_abs` and `passed`. `attrs["all_passed"]` sums it up.

    Raises:
        ImportError: without torch and transformers (the `oracle` extra).
        ValueError: when the two models' architectures differ.

    Example:
    ```python
    model = phi3lab.Phi3Backbone.from_preset("/path/to/checkpoint")
    table = phi3lab.compare_with_transformers(model, "/path/to/checkpoint", ids)
    table[~table.passed]          # any site that disagrees
    ```
    """
    torch, transformers = _import_oracle()
    import phi3lab

    for argument, value in (("atol", atol), ("rtol", rtol)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
            raise bad_argument(argument, value, "a non-negative number")
    reference = _reference_model(hf_model_or_dir, torch, transformers)
    config = reference.config
    expected = {
        "num_layers": (config.num_hidden_layers, model.num_layers),
        "hidden_dim": (config.hidden_size, model.hidden_dim),
        "num_query_heads": (config.num_attention_heads, model.num_query_heads),
        "num_key_value_heads": (config.num_key_value_heads, model.num_key_value_heads),
        "vocabulary_size": (config.vocab_size, model.vocabulary_size),
    }
    different = {key: pair for key, pair in expected.items() if pair[0] != pair[1]}
    if different:
        raise ValueError(
            "`hf_model_or_dir` does not have `model`'s architecture: "
            + ", ".join(f"{key} {hf} (transformers) vs {ours} (phi3lab)" for key, (hf, ours) in different.items())
        )
    chosen = [n for n in select(names, all_names(model.num_layers)) if split_name(n)[1] not in UNCOMPARED]
    if not chosen:
        raise bad_argument("names", names, f"a selection of comparable hook sites (not only {UNCOMPARED})")
    tr = phi3lab.trace(model, inputs, padding_mask=padding_mask, tokenizer=tokenizer, names=chosen)
    ids = np.asarray(tr.token_ids, np.int64)
    mask = np.asarray(tr.padding_mask, bool)
    with _hf_captures(reference, torch) as captured, torch.no_grad():
        reference(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask.astype(np.int64)))
    rows = []
    for name in chosen:
        ours = _real_rows(name, np.asarray(tr[name], np.float64), mask)
        # transformers keeps heads flattened ([B, T, Hq * dh]) where phi3lab splits them.
        theirs = _real_rows(name, np.asarray(captured[name], np.float64).reshape(np.shape(tr[name])), mask)
        diff = float(np.max(np.abs(ours - theirs))) if ours.size else 0.0
        scale = float(np.max(np.abs(theirs))) if theirs.size else 0.0
        rows.append(
            {
                "name": name,
                "layer": split_name(name)[0],
                "shape": tuple(np.shape(tr[name])),
                "max_abs_diff": diff,
                "max_rel_diff": diff / scale if scale > 0 else diff,
                "reference_max_abs": scale,
                "passed": diff <= atol + rtol * scale,
            }
        )
    table = pd.DataFrame(rows)
    table["layer"] = table["layer"].astype("Int64")
    table.attrs.update(atol=atol, rtol=rtol, all_passed=bool(table["passed"].all()))
    return table
