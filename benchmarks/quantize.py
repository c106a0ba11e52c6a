"""int8 weight-only quantization: memory, accuracy and speed (run by hand).

    .venv/bin/python benchmarks/quantize.py [--length 256] [--batch 4] [--runs 5]

Two models, each in float32 and after `model.quantize("int8")`:
  12-layer   12 layers, width 768, 12 heads, MLP 2048, vocabulary 32064,
             random N(0, 0.02) weights (keras-hub's initialization)
  tiny       the shipped trained phi3lab_tiny_en (real weights)
Inputs are real text (this repository's README and design notes) tokenized
by the shipped tokenizer, `--batch` rows of `--length` tokens.

Printed per model: bytes of all weights and of the projection kernels,
logits' max absolute difference (and relative to the largest float logit),
mean absolute difference, top-1 agreement over all positions, and the
median forward time of each variant (compilation excluded) with the ratio.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import jax
import numpy as np
from _common import median_times, random_model

import phi3lab

ROOT = Path(__file__).resolve().parent.parent


def text_batch(tokenizer, batch: int, length: int) -> np.ndarray:
    text = "\n".join((ROOT / name).read_text(encoding="utf-8") for name in ("README.md", "docs/design.md"))
    ids = tokenizer.encode(text)
    if len(ids) < batch * length:
        ids = ids * (batch * length // len(ids) + 1)
    return np.asarray(ids[: batch * length], np.int32).reshape(batch, length)


def nbytes(tree) -> int:
    return sum(int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize for a in jax.tree.leaves(tree))


def logits_fn(model):
    def run(params, ids):
        hidden, _ = model.apply(params, ids)
        return model.token_embedding.apply(params["token_embedding"], hidden, reverse=True)

    return jax.jit(run)


def milliseconds(fn, runs: int) -> float:
    """Median milliseconds of `fn()` (a jax array, waited for) after one untimed call that compiles it."""
    return 1e3 * median_times({"fn": lambda: fn().block_until_ready()}, runs, warmup=1)["fn"]


def measure(name, model, ids, runs):
    float_params = model.params()
    float_logits = np.asarray(logits_fn(model)(float_params, ids))
    run_float = logits_fn(model)
    float_ms = milliseconds(lambda: run_float(float_params, ids), runs)
    kernels_before = nbytes({k: v for k, v in float_params["decoder"].items() if k in ("attention", "mlp")})
    model.quantize("int8")
    int8_params = model.params()
    run_int8 = logits_fn(model)
    int8_logits = np.asarray(run_int8(int8_params, ids))
    int8_ms = milliseconds(lambda: run_int8(int8_params, ids), runs)
    kernels_after = nbytes({k: v for k, v in int8_params["decoder"].items() if k in ("attention", "mlp")})
    diff = np.abs(int8_logits - float_logits)
    agreement = float(np.mean(int8_logits.argmax(-1) == float_logits.argmax(-1)))
    print(f"\n{name}: {model.num_layers} layers, width {model.hidden_dim}, input {ids.shape}")
    print(
        f"  weight bytes, all:      float32 {nbytes(float_params) / 2**20:9.2f} MiB   "
        f"int8 {nbytes(int8_params) / 2**20:9.2f} MiB"
        f"   ratio {nbytes(float_params) / nbytes(int8_params):.2f}x"
    )
    print(
        f"  weight bytes, kernels:  float32 {kernels_before / 2**20:9.2f} MiB   int8 {kernels_after / 2**20:9.2f} MiB"
        f"   ratio {kernels_before / kernels_after:.2f}x (int8 + float32 scales)"
    )
    print(
        f"  logits max |diff| {diff.max():.4g} (max |float logit| {np.abs(float_logits).max():.4g}, "
        f"relative {diff.max() / np.abs(float_logits).max():.3g}); mean |diff| {diff.mean():.3g}"
    )
    print(f"  top-1 agreement {agreement:.4f} over {float_logits.shape[0] * float_logits.shape[1]} positions")
    print(
        f"  forward + logits median: float32 {float_ms:.1f} ms, int8 {int8_ms:.1f} ms, ratio {int8_ms / float_ms:.2f}"
        f" ({jax.devices()[0].platform})"
    )


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    tokenizer = phi3lab.Phi3Tokenizer.from_preset("phi3lab_tiny_en")
    tiny = phi3lab.Phi3Backbone.from_preset("phi3lab_tiny_en")
    tiny_ids = text_batch(tokenizer, args.batch, min(args.length, tiny.max_sequence_length))
    measure(
        "12-layer (random N(0, 0.02) weights)",
        random_model(),
        text_batch(tokenizer, args.batch, args.length),
        args.runs,
    )
    measure("phi3lab_tiny_en (trained)", tiny, tiny_ids, args.runs)


if __name__ == "__main__":
    main()
