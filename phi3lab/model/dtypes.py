"""The backbone's `dtype` argument: one float policy, or keras' per-layer map.

`Phi3Backbone(dtype=...)` takes what keras-hub's backbones take: a policy
name (`"float32"`, `"bfloat16"`, `"mixed_bfloat16"`), a `keras.DTypePolicy`,
or a `keras.dtype_policies.DTypePolicyMap` (the form keras writes for a
quantized model's config). phi3lab's layers share one float policy (the
map's default); a map's entries, keyed by the paths of phi3lab's own
weight-holding layers (`WEIGHT_LAYERS`, relative to the backbone), may give
the projection-kernel layers (`QUANTIZABLE_LAYERS`) keras' int8 policy,
which means phi3lab's weight-only int8 (`phi3lab.model.quantize`).

Serialized policies (dicts, as `get_config()` and `.keras` files hold them)
are read here field by field: only keras' own policy classes, rebuilt from
their names, never deserialized as objects.
"""

from __future__ import annotations

import dataclasses
import re

import keras

from phi3lab.errors import bad_argument

# phi3lab's layers that hold weights, by path relative to the backbone: the
# keys a DTypePolicyMap entry may name (exactly or as a regex).
WEIGHT_LAYERS = (
    "token_embedding",
    "decoder/attention_norm",
    "decoder/attention",
    "decoder/mlp_norm",
    "decoder/mlp",
    "final_norm",
)
# The layers whose stacked projection kernels `quantize("int8")` quantizes.
QUANTIZABLE_LAYERS = ("decoder/attention", "decoder/mlp")

FLOAT8_REFUSAL = (
    "keras' float8 mode is a training scheme, not weight storage: the kernels stay float32 and every "
    "forward pass rounds inputs and kernels to float8 with scales taken from amax histories that each "
    "training step updates (delayed scaling, on keras' Dense/EinsumDense layers). It saves no memory, "
    "keras-hub ships no float8 Phi-3 preset, and its numbers depend on a training history phi3lab's "
    'stacked layers do not keep. For smaller weights use model.quantize("int8")'
)
_POLICY_CLASSES = ("DTypePolicy", "QuantizedDTypePolicy", "QuantizedFloat8DTypePolicy", "DTypePolicyMap")
_ACCEPTED = (
    'None, a dtype policy name such as "float32", "bfloat16" or "mixed_bfloat16", a keras.DTypePolicy, '
    "or a keras.dtype_policies.DTypePolicyMap over phi3lab's layers"
)


@dataclasses.dataclass(frozen=True)
class DTypeChoice:
    """What a `dtype` argument asks for.

    Attributes:
        policy: the float policy name every layer is built with, or None
            for keras' global default (`keras.config.dtype_policy()`).
        quantization: `"int8"` when a DTypePolicyMap gives
            `QUANTIZABLE_LAYERS` keras' int8 policy, else None.
    """

    policy: str | None
    quantization: str | None = None


def serialized_policy_map(policy: keras.DTypePolicy, layers: dict) -> dict | None:
    """The `dtype` a quantized model's `get_config()` writes: keras'
    DTypePolicyMap of the float `policy` and each quantized layer's own (as
    keras-hub's backbones write it), serialized; None when `layers` (path ->
    layer, as `Phi3Backbone.weight_layers()` gives them) holds no quantized one."""
    quantized = {path: layer.dtype_policy for path, layer in layers.items() if layer.quantization_mode}
    if not quantized:
        return None
    return keras.dtype_policies.serialize(keras.dtype_policies.DTypePolicyMap(policy, quantized))


def check_quantize_mode(mode: str, options: dict) -> None:
    """`Phi3Backbone.quantize`'s arguments: `"int8"` and no options."""
    if mode == "float8":
        raise bad_argument("mode", mode, f'"int8" ({FLOAT8_REFUSAL})')
    if mode != "int8" or options:
        raise bad_argument(
            "mode",
            mode if not options else (mode, options),
            '"int8" (weight-only, per-output-channel scales; no other mode or option is supported)',
        )


def read_dtype(dtype) -> DTypeChoice:
    """Check the backbone's `dtype` argument and say what it asks for.

    Args:
        dtype: None, a policy name, a `keras.DTypePolicy`, a
            `keras.dtype_policies.DTypePolicyMap`, or one of these serialized
            (a dict, as `get_config()` writes it).

    Returns:
        A `DTypeChoice`. Raises a ValueError naming `dtype` for anything
        else: an unknown name, a quantized policy for the whole model, a map
        entry that names no phi3lab layer, gives a layer another float
        policy, quantizes the embeddings or norms, uses float8 (see
        `FLOAT8_REFUSAL`) or quantizes only one of `QUANTIZABLE_LAYERS`.

    Example:
    >>> policies = keras.dtype_policies
    >>> read_dtype(policies.DTypePolicyMap("float32", {
    ...     "decoder/attention": policies.get("int8_from_float32"),
    ...     "decoder/mlp": policies.get("int8_from_float32")}))
    DTypeChoice(policy='float32', quantization='int8')
    """
    if dtype is None:
        return DTypeChoice(None)
    policy = _policy_from_dict(dtype) if isinstance(dtype, dict) else dtype
    if isinstance(policy, keras.dtype_policies.DTypePolicyMap):
        return _read_map(policy)
    if not isinstance(policy, (str, keras.DTypePolicy)):
        raise bad_argument("dtype", dtype, _ACCEPTED)
    policy = _get(policy)
    if policy.quantization_mode is not None:
        raise bad_argument(
            "dtype",
            dtype,
            f"{_ACCEPTED}; a quantized policy applies to single layers (give it in a DTypePolicyMap entry, "
            'or call model.quantize("int8"))',
        )
    return DTypeChoice(policy.name)


def _read_map(policy_map) -> DTypeChoice:
    default = policy_map.default_policy
    if default.quantization_mode is not None:
        raise bad_argument("dtype", policy_map, f"{_ACCEPTED}, whose default policy is a float one")
    for key in policy_map.keys():
        if not any(_matches(key, path) for path in WEIGHT_LAYERS):
            raise bad_argument(
                "dtype",
                policy_map,
                f"a DTypePolicyMap whose keys name phi3lab's layers {list(WEIGHT_LAYERS)} (exactly or as "
                f"regular expressions); its key {key!r} matches none of them (keras-hub's own layer paths "
                "do not exist in phi3lab's stacked layers)",
            )
    quantized = []
    for path in WEIGHT_LAYERS:
        try:
            policy = _get(policy_map[path])
        except ValueError as error:  # a path matched by several regex keys
            raise bad_argument("dtype", policy_map, f"a DTypePolicyMap with one entry per layer ({error})") from None
        mode = policy.quantization_mode
        if mode is None:
            if policy.name != default.name:
                raise bad_argument(
                    "dtype",
                    policy_map,
                    f"a DTypePolicyMap whose float entries equal its default policy {default.name!r} "
                    f"(phi3lab's layers share one float policy); {path!r} has {policy.name!r}",
                )
            continue
        if mode == "float8":
            raise bad_argument("dtype", policy_map, f"a DTypePolicyMap without float8 entries ({FLOAT8_REFUSAL})")
        if mode != "int8" or path not in QUANTIZABLE_LAYERS:
            raise bad_argument(
                "dtype",
                policy_map,
                f"a DTypePolicyMap whose quantized entries are int8 policies of {list(QUANTIZABLE_LAYERS)} "
                f"(phi3lab quantizes the projection kernels only); {path!r} has {policy.name!r}",
            )
        if policy.compute_dtype != default.compute_dtype or policy.variable_dtype != default.variable_dtype:
            raise bad_argument(
                "dtype",
                policy_map,
                f"int8 entries quantized from the map's default policy (int8_from_{default.name}); "
                f"{path!r} has {policy.name!r}",
            )
        quantized.append(path)
    if quantized and tuple(quantized) != QUANTIZABLE_LAYERS:
        raise bad_argument(
            "dtype",
            policy_map,
            f"a DTypePolicyMap that quantizes all of {list(QUANTIZABLE_LAYERS)} or none (phi3lab's int8 "
            f"covers every projection kernel); it quantizes only {quantized}",
        )
    return DTypeChoice(default.name, "int8" if quantized else None)


def _matches(key: str, path: str) -> bool:
    """keras' DTypePolicyMap lookup rule: an exact key, else a regex fullmatch."""
    if key == path:
        return True
    try:
        return re.fullmatch(key, path) is not None
    except re.error:
        return False


def _get(name_or_policy) -> keras.DTypePolicy:
    try:
        return keras.dtype_policies.get(name_or_policy)
    except ValueError as error:
        raise bad_argument("dtype", name_or_policy, f"{_ACCEPTED} ({error})") from None


def _serialized_policy(value, default: str | None = None) -> keras.DTypePolicy:
    """One policy inside a serialized DTypePolicyMap: a name or a dict."""
    if isinstance(value, str):
        return _get(value)
    if isinstance(value, dict):
        return _policy_from_dict(value, default)
    raise bad_argument("dtype", value, "a dtype policy name or a serialized keras dtype policy")


def _policy_from_dict(serialized: dict, default: str | None = None):
    """A policy or DTypePolicyMap from its serialized dict, read field by
    field: keras' own policy classes only, rebuilt from their names."""
    class_name = serialized.get("class_name")
    module = serialized.get("module")
    config = serialized.get("config")
    if (
        class_name not in _POLICY_CLASSES
        or not (module is None or module == "keras" or (isinstance(module, str) and module.startswith("keras.")))
        or serialized.get("registered_name") not in (None, class_name)
        or not isinstance(config, dict)
    ):
        raise bad_argument("dtype", serialized, f"{_ACCEPTED}, or one of keras' dtype policies serialized")
    if class_name == "DTypePolicyMap":
        inner_default = config.get("default_policy")
        default_policy = None if inner_default is None else _serialized_policy(inner_default)
        entries = config.get("policy_map")
        if not isinstance(entries, dict) or not all(isinstance(key, str) for key in entries):
            raise bad_argument("dtype", serialized, "a serialized DTypePolicyMap whose policy_map is a dict")
        source = (default_policy or keras.config.dtype_policy()).name
        policies = {key: _serialized_policy(value, source) for key, value in entries.items()}
        return keras.dtype_policies.DTypePolicyMap(default_policy, policies)
    if class_name == "DTypePolicy":
        name = config.get("name")
    else:
        # keras writes no source name in a map without a default policy.
        mode, source = config.get("mode"), config.get("source_name") or default
        name = f"{mode}_from_{source}" if isinstance(mode, str) and isinstance(source, str) else None
    if not isinstance(name, str):
        raise bad_argument("dtype", serialized, "a serialized keras dtype policy with a name (or mode and source)")
    return _get(name)
