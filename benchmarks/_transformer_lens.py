"""TransformerLens 4 as the benchmarks' torch peer: a `TransformerBridge`
of the benchmark model's shapes.

TransformerLens 4 removed `HookedTransformer`; its API is `TransformerBridge`,
and `TransformerBridge.boot_native(config)` builds a randomly initialised
model from a config (no hub, no transformers checkpoint). SAELens, one of the
test oracles, pins `transformer-lens<4`, so `make bench-deps` installs 4.x
into a side folder of the venv (`.venv/transformer-lens-4`), which only the
benchmark processes put first on `sys.path`.
"""

from __future__ import annotations

import importlib.metadata
import sys
from pathlib import Path

SIDE_FOLDER = Path(sys.prefix) / "transformer-lens-4"


def bridge(config: dict, n_ctx: int, threads: int | None = None):
    """`(torch, TransformerBridge)` of `config`'s shapes (phi3lab's
    constructor arguments: grouped-query heads, gated SiLU MLP, RMS norm,
    rotary), float32 on the CPU, or None (with the reason printed) when
    TransformerLens 4 is not installed (`make bench-deps`)."""
    if SIDE_FOLDER.is_dir() and str(SIDE_FOLDER) not in sys.path:
        sys.path.insert(0, str(SIDE_FOLDER))
    try:
        import torch
        import transformer_lens
        from transformer_lens.model_bridge import TransformerBridge
        from transformer_lens.model_bridge.sources import native  # noqa: F401  (adds boot_native)
    except Exception as error:  # not installed, or a dependency missing
        print(f"(TransformerLens 4 not importable: {type(error).__name__}: {error}; run `make bench-deps`)")
        return None
    if threads is not None:
        torch.set_num_threads(threads)
    version = importlib.metadata.version("transformer-lens")
    if int(version.split(".")[0]) < 4:
        print(f"(TransformerLens {version} found, 4.x needed: run `make bench-deps`)")
        return None
    print(
        f"TransformerLens {version} (TransformerBridge.boot_native) from {Path(transformer_lens.__file__).parent}, "
        f"torch {torch.__version__} CPU, {torch.get_num_threads()} threads"
    )
    heads = config["num_query_heads"]
    model = TransformerBridge.boot_native(
        dict(
            d_model=config["hidden_dim"],
            n_layers=config["num_layers"],
            n_heads=heads,
            n_key_value_heads=config["num_key_value_heads"],
            d_head=config["hidden_dim"] // heads,
            d_mlp=config["intermediate_dim"],
            d_vocab=config["vocabulary_size"],
            act_fn="silu",
            gated_mlp=True,
            normalization_type="RMS",
            positional_embedding_type="rotary",
            n_ctx=n_ctx,
            seed=0,
        ),
        dtype=torch.float32,
        device="cpu",
    ).eval()
    return torch, model
