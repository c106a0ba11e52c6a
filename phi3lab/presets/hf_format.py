"""Hugging Face Phi-3 checkpoints: `config.json` plus `*.safetensors`.

The layouts of microsoft/Phi-3-mini-4k-instruct and -128k-instruct: fused
`qkv_proj` and `gate_up_proj` weights (separate `q_proj`/`k_proj`/`v_proj`
and `gate_proj`/`up_proj` are accepted too), `rope_scaling` of type "su" or
"longrope" (or transformers 5's `rope_parameters`), and
`original_max_position_embeddings`. Sharded checkpoints come with
`model.safetensors.index.json`. Tensors are read lazily (memory-mapped) and
copied into the model one at a time.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Callable

import jax
import numpy as np
from jax import numpy as jnp

from phi3lab.model.rotary import RotarySpec
from phi3lab.model.stacked import layer_of, layer_slice
from phi3lab.presets.preflight import Axis, PresetLayout, axis
from phi3lab.presets.safetensors_io import PendingTensor, SafetensorsFile, write_safetensors
from phi3lab.presets.weights import WeightFiller
from phi3lab.runtime import compile_cache

# phi3lab's size arguments -> the config.json keys Hugging Face gives them.
CONFIG_KEYS = {
    "vocabulary_size": "vocab_size",
    "num_layers": "num_hidden_layers",
    "hidden_dim": "hidden_size",
    "intermediate_dim": "intermediate_size",
    "num_query_heads": "num_attention_heads",
    "num_key_value_heads": "num_key_value_heads",
}
_FUSED_QKV = Axis(
    ("num_query_heads", "num_key_value_heads", "hidden_dim"),
    lambda c: (c.num_query_heads + 2 * c.num_key_value_heads) * c.head_dim,
)
LAYOUT = PresetLayout(
    probes={
        "model.embed_tokens.weight": (axis("vocabulary_size"), axis("hidden_dim")),
        "model.layers.0.self_attn.qkv_proj.weight": (_FUSED_QKV, axis("hidden_dim")),
        "model.layers.0.self_attn.k_proj.weight": (axis("num_key_value_heads", "head_dim"), axis("hidden_dim")),
        "model.layers.0.mlp.down_proj.weight": (axis("hidden_dim"), axis("intermediate_dim")),
    },
    layer_pattern=re.compile(r"model\.layers\.(\d+)\."),
    file_keys=CONFIG_KEYS,
)


def is_hf_dir(directory: Path) -> bool:
    config = directory / "config.json"
    return config.is_file() and "model_type" in json.loads(config.read_text())


def read_config(directory: Path) -> dict:
    """Constructor arguments from a Hugging Face Phi-3 `config.json`."""
    path = directory / "config.json"
    hf = json.loads(path.read_text())
    if hf.get("model_type") != "phi3":
        raise ValueError(f"{path} has model_type={hf.get('model_type')!r}; phi3lab loads 'phi3' checkpoints.")
    missing = [key for key in CONFIG_KEYS.values() if key != "num_key_value_heads" and key not in hf]
    if missing:
        raise ValueError(f"{path} lacks {missing}, which a Phi-3 config.json defines.")
    rope = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    if not isinstance(rope, dict):
        raise ValueError(f"{path}: 'rope_scaling' must be a JSON object or null; received {rope!r}.")
    rope = dict(rope)
    kwargs = {name: hf.get(key) for name, key in CONFIG_KEYS.items()}
    kwargs["num_key_value_heads"] = kwargs["num_key_value_heads"] or kwargs["num_query_heads"]
    kwargs |= {
        "layer_norm_epsilon": hf.get("rms_norm_eps", 1e-5),
        "max_sequence_length": hf.get("max_position_embeddings", 4096),
        "rope_max_wavelength": hf.get("rope_theta", rope.get("rope_theta", 10000.0)),
        "sliding_window": hf.get("sliding_window"),
    }
    kwargs["pretraining_sequence_length"] = hf.get(
        "original_max_position_embeddings",
        rope.get("original_max_position_embeddings", kwargs["max_sequence_length"]),
    )
    kwargs["partial_rotary_factor"] = hf.get("partial_rotary_factor", rope.get("partial_rotary_factor", 1.0))
    kwargs["tie_word_embeddings"] = hf.get("tie_word_embeddings", False)
    kind = rope.get("type", rope.get("rope_type"))
    if kind in ("su", "longrope"):
        kwargs["rope_scaling_type"] = "su"
        kwargs["rope_scaling_short_factor"] = rope.get("short_factor")
        kwargs["rope_scaling_long_factor"] = rope.get("long_factor")
        _check_no_override(path, rope, kwargs)
    elif kind not in (None, "default"):
        raise ValueError(f"{path}: rope scaling type {kind!r} is not Phi-3's; accepted: None, 'su', 'longrope'.")
    return kwargs


def _check_no_override(path, rope, kwargs):
    """transformers lets `factor`/`attention_factor` override the values
    Phi-3 derives from the context lengths; refuse rather than silently
    computing something else."""
    scale = kwargs["max_sequence_length"] / kwargs["pretraining_sequence_length"]
    if rope.get("factor") not in (None, scale):
        raise ValueError(
            f"{path}: rope 'factor'={rope['factor']} differs from max/original positions ({scale}); unsupported."
        )
    if rope.get("attention_factor") is not None:
        derived = RotarySpec.su_attention_factor(kwargs["max_sequence_length"], kwargs["pretraining_sequence_length"])
        if not math.isclose(rope["attention_factor"], derived, rel_tol=1e-6):
            raise ValueError(
                f"{path}: rope 'attention_factor'={rope['attention_factor']} differs from Phi-3's {derived}; "
                "unsupported."
            )


def _inside(directory: Path, path: Path) -> bool:
    """Whether `path`, symlinks resolved, lies inside `directory`, or, for a
    Hugging Face hub snapshot (`.../snapshots/<revision>`, whose files are
    symlinks to `../../blobs/<hash>`), inside that repository's `blobs` folder."""
    root, target = directory.resolve(), path.resolve()
    roots = [root]
    if root.parent.name == "snapshots" and (root.parent.parent / "blobs").is_dir():
        roots.append(root.parent.parent / "blobs")
    return any(r in target.parents for r in roots)


class _Checkpoint:
    """All tensors of a (possibly sharded) safetensors checkpoint by name."""

    def __init__(self, directory: Path):
        index = directory / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))
            except (UnicodeDecodeError, ValueError, RecursionError) as error:
                raise ValueError(f"{index} is not valid JSON: {error}") from None
            weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
            if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
                raise ValueError(f"{index} must hold a 'weight_map' object mapping tensor names to shard file names.")
            files = {}
            for name, file_name in weight_map.items():
                target = (directory / file_name).resolve()
                if not _inside(directory, directory / file_name):
                    raise ValueError(f"{index}: shard {file_name!r} lies outside the preset directory.")
                if file_name not in files:
                    files[file_name] = SafetensorsFile(target)
            self.where = {name: files[file_name] for name, file_name in weight_map.items()}
        elif (directory / "model.safetensors").is_file():
            if not _inside(directory, directory / "model.safetensors"):
                raise ValueError(f"{directory / 'model.safetensors'} is a link to a file outside the preset directory.")
            single = SafetensorsFile(directory / "model.safetensors")
            self.where = {name: single for name in single.keys()}
        else:
            raise FileNotFoundError(
                f"{directory} has neither model.safetensors nor "
                "model.safetensors.index.json (phi3lab reads safetensors only)."
            )
        self.directory = directory

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor's shape, from the files' headers (no data is read)."""
        return {name: file.shape(name) for name, file in self.where.items()}

    def __contains__(self, name):
        return name in self.where

    def drop_pages(self) -> None:
        """`SafetensorsFile.drop_pages` of every file."""
        for file in set(self.where.values()):
            file.drop_pages()

    def get(self, name: str, needed_for: str, shape: tuple | None = None) -> np.ndarray:
        """The tensor `name`; with `shape`, checked in the checkpoint's own
        layout (before any transpose, so the message shows the file's shapes)."""
        if name not in self.where:
            raise ValueError(f"The checkpoint at {self.directory} has no tensor {name!r} (needed for {needed_for}).")
        value = self.where[name].tensor(name)
        if shape is not None and tuple(value.shape) != tuple(shape):
            raise ValueError(f"Tensor {name!r} has shape {tuple(value.shape)}, expected {tuple(shape)}.")
        return value


def tensor_shapes(directory: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape in the checkpoint at `directory`, from the
    safetensors headers alone (checked as `SafetensorsFile` checks them)."""
    return _Checkpoint(directory).shapes()


def load_weights(model, directory: Path, quantize: bool = False) -> None:
    """Copy a Hugging Face Phi-3 checkpoint's tensors into `model`; with
    `quantize`, into its int8 kernels, quantized as they are read (`WeightFiller`)."""
    checkpoint = _Checkpoint(directory)
    filler = WeightFiller(model, quantize=quantize)
    d, hq, hkv = model.hidden_dim, model.num_query_heads, model.num_key_value_heads
    dh, f = model.head_dim, model.intermediate_dim

    embed = checkpoint.get("model.embed_tokens.weight", "token_embedding/embeddings")
    filler.put("token_embedding/embeddings", embed, source="model.embed_tokens.weight")
    # A tied model's LM head is the token embedding (transformers writes no
    # lm_head.weight then, and ignores one if present); an untied model
    # needs lm_head.weight.
    if not model.tie_word_embeddings:
        head = checkpoint.get(
            "lm_head.weight",
            "token_embedding/reverse_embeddings (the config does not tie word embeddings)",
            (model.vocabulary_size, d),
        )
        filler.put("token_embedding/reverse_embeddings", head.T, source="lm_head.weight")
    filler.put("final_norm/scale", checkpoint.get("model.norm.weight", "final_norm/scale"), source="model.norm.weight")
    checkpoint.drop_pages()

    for i in range(model.num_layers):
        p = f"model.layers.{i}."
        put = lambda key, value, source: filler.put(key, value, layer=i, source=source)
        put(
            "decoder/attention_norm/scale",
            checkpoint.get(p + "input_layernorm.weight", "attention_norm"),
            p + "input_layernorm.weight",
        )
        put(
            "decoder/mlp_norm/scale",
            checkpoint.get(p + "post_attention_layernorm.weight", "mlp_norm"),
            p + "post_attention_layernorm.weight",
        )
        fused = p + "self_attn.qkv_proj.weight"
        if fused in checkpoint:
            qkv = checkpoint.get(fused, "attention")
            expected = ((hq + 2 * hkv) * dh, d)
            if qkv.shape != expected:
                raise ValueError(f"Tensor {fused!r} has shape {qkv.shape}, expected {expected}.")
            q, k, v = np.split(qkv, [hq * dh, (hq + hkv) * dh], axis=0)
            sources = (fused,) * 3
        else:
            sources = tuple(p + f"self_attn.{n}_proj.weight" for n in "qkv")
            q, k, v = (checkpoint.get(s, "attention") for s in sources)
        for key, value, heads, source in (
            ("query", q, hq, sources[0]),
            ("key", k, hkv, sources[1]),
            ("value", v, hkv, sources[2]),
        ):
            if value.shape != (heads * dh, d):
                raise ValueError(f"Tensor {source!r} has shape {value.shape}, expected {(heads * dh, d)}.")
            put(f"decoder/attention/{key}_kernel", value.reshape(heads, dh, d).transpose(2, 0, 1), source)
        o = checkpoint.get(p + "self_attn.o_proj.weight", "attention/output_kernel")
        if o.shape != (d, hq * dh):
            raise ValueError(f"Tensor {p + 'self_attn.o_proj.weight'!r} has shape {o.shape}, expected {(d, hq * dh)}.")
        put("decoder/attention/output_kernel", o.T.reshape(hq, dh, d), p + "self_attn.o_proj.weight")
        fused = p + "mlp.gate_up_proj.weight"
        if fused in checkpoint:
            gate_up = checkpoint.get(fused, "mlp")
            if gate_up.shape != (2 * f, d):
                raise ValueError(f"Tensor {fused!r} has shape {gate_up.shape}, expected {(2 * f, d)}.")
            gate, up = gate_up[:f], gate_up[f:]
            gate_source = up_source = fused
        else:
            gate_source, up_source = p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"
            gate, up = checkpoint.get(gate_source, "mlp", (f, d)), checkpoint.get(up_source, "mlp", (f, d))
        put("decoder/mlp/gate_kernel", gate.T, gate_source)
        put("decoder/mlp/up_kernel", up.T, up_source)
        put(
            "decoder/mlp/down_kernel",
            checkpoint.get(p + "mlp.down_proj.weight", "mlp", (d, f)).T,
            p + "mlp.down_proj.weight",
        )
        checkpoint.drop_pages()  # this layer's tensors are copied
    filler.finish(str(directory))


def _heads_out(kernel: jax.Array, i: jax.Array) -> jax.Array:
    """Layer `i` of a `[L, D, H, dh]` kernel in Hugging Face's `[H * dh, D]` layout."""
    layer = layer_of(kernel, i)
    return jnp.transpose(layer, (1, 2, 0)).reshape(-1, layer.shape[0])


# How each layer tensor is made from the stacked weights and the layer index
# (an input, so one compiled program serves every layer): about one output
# tensor is allocated at a time.
_CONVERSIONS = {
    "qkv_proj": lambda q, k, v, i: jnp.concatenate([_heads_out(x, i) for x in (q, k, v)]),
    "o_proj": lambda o, i: layer_of(o, i).reshape(-1, o.shape[-1]).T,
    "gate_up_proj": lambda gate, up, i: jnp.concatenate([layer_of(gate, i).T, layer_of(up, i).T]),
    "transposed_layer": lambda kernel, i: layer_of(kernel, i).T,
    "transposed": jnp.transpose,
}


def hf_tensors(model) -> dict[str, Callable[[], jax.Array]]:
    """Each tensor of `model`'s Hugging Face checkpoint (fused layout), in
    file order, as a function making it from the model's weights (one
    layer's slice, transposed or fused, at a time) by a program in the
    model's compile cache (`compile_cache.traceable`: `save_checkpoint`
    sizes the tensors under `jax.eval_shape`)."""
    convert = {kind: compile_cache.traceable(model, ("export", kind), fn) for kind, fn in _CONVERSIONS.items()}
    params = model.params()
    embedding, dec = params["token_embedding"], params["decoder"]
    attention, mlp = dec["attention"], dec["mlp"]
    tensors = {"model.embed_tokens.weight": lambda: embedding["embeddings"]}
    for i in range(model.num_layers):
        p = f"model.layers.{i}."
        qkv = (attention["query_kernel"], attention["key_kernel"], attention["value_kernel"])
        tensors |= {
            p + "input_layernorm.weight": lambda i=i: layer_slice(model, dec["attention_norm"]["scale"], i),
            p + "post_attention_layernorm.weight": lambda i=i: layer_slice(model, dec["mlp_norm"]["scale"], i),
            p + "self_attn.qkv_proj.weight": lambda i=i, qkv=qkv: convert["qkv_proj"](*qkv, i),
            p + "self_attn.o_proj.weight": lambda i=i: convert["o_proj"](attention["output_kernel"], i),
            p + "mlp.gate_up_proj.weight": lambda i=i: convert["gate_up_proj"](mlp["gate_kernel"], mlp["up_kernel"], i),
            p + "mlp.down_proj.weight": lambda i=i: convert["transposed_layer"](mlp["down_kernel"], i),
        }
    tensors["model.norm.weight"] = lambda: params["final_norm"]["scale"]
    if not model.tie_word_embeddings:
        tensors["lm_head.weight"] = lambda: convert["transposed"](embedding["reverse_embeddings"])
    return tensors


def save_checkpoint(model, directory: str | Path, max_shard_bytes: int = 4 * 2**30) -> Path:
    """Write `model` as a Hugging Face Phi-3 checkpoint (fused layout).

    Shards above `max_shard_bytes` and writes `model.safetensors.index.json`
    when more than one shard is needed. Streams: shards are planned from the
    tensors' shapes alone, then each tensor is made (one layer's slice,
    transposed or fused), written and dropped before the next, so a save
    needs about one tensor's memory beside the weights. A model with tied
    embeddings writes no `lm_head.weight`, as transformers does. An
    int8-quantized model is refused (save before quantizing).
    """
    refuse_quantized(model, "save_hf_checkpoint")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    shards, size = [{}], 0
    for name, make in hf_tensors(model).items():
        spec = jax.eval_shape(make)
        nbytes = math.prod(spec.shape) * np.dtype(spec.dtype).itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = PendingTensor(tuple(spec.shape), np.dtype(spec.dtype), make)
        size += nbytes
    weight_map = {}
    for number, tensors in enumerate(shards, start=1):
        file_name = "model.safetensors" if len(shards) == 1 else f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        partial = directory / f"{file_name}.partial"
        write_safetensors(partial, tensors, {"format": "pt"})
        partial.rename(directory / file_name)
        weight_map |= dict.fromkeys(tensors, file_name)
    if len(shards) > 1:
        (directory / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2)
        )
    (directory / "config.json").write_text(json.dumps(hf_config(model), indent=2))
    return directory


def hf_config(model) -> dict:
    """The Hugging Face `config.json` dict describing `model`."""
    config = {
        "architectures": ["Phi3ForCausalLM"],
        "model_type": "phi3",
        "vocab_size": model.vocabulary_size,
        "hidden_size": model.hidden_dim,
        "intermediate_size": model.intermediate_dim,
        "num_hidden_layers": model.num_layers,
        "num_attention_heads": model.num_query_heads,
        "num_key_value_heads": model.num_key_value_heads,
        "rms_norm_eps": model.layer_norm_epsilon,
        "max_position_embeddings": model.max_sequence_length,
        "original_max_position_embeddings": model.pretraining_sequence_length,
        "rope_theta": float(model.rope_max_wavelength),
        "rope_scaling": None,
        "sliding_window": model.sliding_window,
        "hidden_act": "silu",
        "partial_rotary_factor": model.partial_rotary_factor,
        "tie_word_embeddings": model.tie_word_embeddings,
        "attention_bias": False,
    }
    # Phi-3's special ids, where the vocabulary has room for them.
    for key, token_id in (("bos_token_id", 1), ("eos_token_id", 32000), ("pad_token_id", 32000)):
        config[key] = token_id if token_id < model.vocabulary_size else None
    if model.rope_scaling_type == "su":
        config["rope_scaling"] = {
            "type": "longrope",
            "short_factor": list(model.rope_scaling_short_factor),
            "long_factor": list(model.rope_scaling_long_factor),
        }
    return config


def refuse_quantized(model, writer: str) -> None:
    """Hugging Face checkpoints hold float weights: refuse an int8-quantized model."""
    if getattr(model, "quantization", None) is not None:
        raise ValueError(
            f"{writer} writes float weights, but this model is quantized (quantization={model.quantization!r}). "
            "Save it before calling quantize(), or save the quantized model with model.save('name.keras') "
            "or phi3lab.presets.save_preset(model, directory) (keras.saving.load_model and "
            "Phi3Backbone.from_preset read them back)."
        )
