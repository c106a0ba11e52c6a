"""Train sparse dictionaries for the shipped model, seeded (run by hand).

    .venv/bin/python scripts/train_dictionaries.py [--out /tmp/phi3lab_dictionaries] [--transcoders]

The shipped dictionaries (`phi3lab/assets/phi3lab_tiny_en/dictionaries/`, card in
`docs/features.md`) are this command's output:

    .venv/bin/python scripts/train_dictionaries.py --transcoders \
        --out phi3lab/assets/phi3lab_tiny_en/dictionaries

A top-k SAE on `blocks.{--layer}.hook_resid_post` and, with `--transcoders`,
one top-k transcoder per layer (`ln2.hook_normalized` -> `hook_mlp_out`),
trained on activations streamed from `phi3lab_tiny_en` over documents drawn
like its training corpus (`scripts/train_tiny.py`, another seed), and
evaluated on held-out documents (explained variance, L0, CE-loss
recovered). Each dictionary is written in SAELens' format under `--out`
with its evaluation in `evaluation.json`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_tiny import documents, token_stream  # noqa: E402

import phi3lab  # noqa: E402
import phi3lab.features as F  # noqa: E402

LENGTH = 64


def rows(tokenizer, count: int, seed: int) -> np.ndarray:
    """`[N, LENGTH]` token ids cut from a stream of `count` documents."""
    stream = token_stream(tokenizer, documents(count, seed=seed, token_share=0.3, opener_share=0.3), seed=seed)
    usable = len(stream) // LENGTH * LENGTH
    return stream[:usable].reshape(-1, LENGTH)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("/tmp/phi3lab_dictionaries"))
    parser.add_argument("--layer", type=int, default=2)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=1_000_000, help="training tokens of the SAE")
    parser.add_argument("--transcoder-tokens", type=int, default=500_000, help="training tokens per transcoder")
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--transcoders", action="store_true")
    args = parser.parse_args()

    model = phi3lab.Phi3Backbone.from_preset("phi3lab_tiny_en")
    tokenizer = phi3lab.Phi3Tokenizer.from_preset("phi3lab_tiny_en")
    train_ids = rows(tokenizer, 4000, seed=1000 + args.seed)
    held_out = rows(tokenizer, 200, seed=2000 + args.seed)[:64]
    jobs = {f"resid_post_{args.layer}": dict(site=f"blocks.{args.layer}.hook_resid_post", tokens=args.tokens)}
    if args.transcoders:
        for layer in range(model.num_layers):
            jobs[f"transcoder_{layer}"] = dict(
                site=f"blocks.{layer}.ln2.hook_normalized",
                target_site=f"blocks.{layer}.hook_mlp_out",
                tokens=args.transcoder_tokens,
            )
    for name, sites in jobs.items():
        start = time.perf_counter()
        result = F.train(
            model,
            train_ids,
            kind="topk",
            width=args.width,
            k=args.k,
            batch_size=args.batch,
            lr=args.lr,
            seed=args.seed,
            **sites,
        )
        row = F.evaluate(model, result.dictionary, held_out).iloc[0].to_dict()
        row["train_seconds"] = time.perf_counter() - start
        result.dictionary.save(args.out / name)
        (args.out / name / "evaluation.json").write_text(json.dumps(row, indent=2))
        print(name, json.dumps({key: round(float(value), 4) for key, value in row.items()}))


if __name__ == "__main__":
    main()
