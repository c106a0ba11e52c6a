"""FeatureView's one pass over a store against one trace per document (run by hand).

    .venv/bin/python benchmarks/feature_view.py [--documents 400] [--repeats 3]

Rows (ratios measured side by side in one process; on a shared machine the
absolute times are noisy):

  collect + summarize   `activations.collect` of the SAE's site over the
                        documents, then `features.summarize`: every
                        feature's top rows, counts and histogram in one
                        compiled fold over the store (what FeatureView does
                        with texts).
  summarize             the fold alone, on the collected store (what
                        FeatureView does with a store).
  trace per document    `phi3lab.trace` of each document alone, `encode`,
                        and the per-feature top rows kept with NumPy: the
                        way the view does not do it.

Model: the shipped `phi3lab_tiny_en` and its `resid_post_2` SAE, on held-out
name-mover prompts.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("KERAS_BACKEND", "jax")

import numpy as np  # noqa: E402
from _common import machine, median_times, print_ratio_rows  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--documents", type=int, default=400)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import phi3lab
    import phi3lab.features as F
    from phi3lab import tasks

    model = phi3lab.Phi3Backbone.from_preset("phi3lab_tiny_en")
    tok = phi3lab.Phi3Tokenizer.from_preset("phi3lab_tiny_en")
    sae = F.from_preset("phi3lab_tiny_en", "resid_post_2")
    site = sae.config.site
    documents = [tok.encode(p.text) for p in tasks.name_mover_prompts(args.documents, seed=1)]
    store = phi3lab.activations.collect(model, documents, site, progress=False)

    def per_document(top: int = 12):
        best = np.zeros((sae.config.d_sae, 0), np.float32)
        for ids in documents:
            acts = np.asarray(sae.encode(phi3lab.trace(model, ids, names=site)[site][0]))
            best = -np.sort(-np.concatenate([best, acts.T], axis=1), axis=1)[:, :top]
        return best

    times = median_times(
        {
            "collect + summarize": lambda: F.summarize(
                sae, phi3lab.activations.collect(model, documents, site, progress=False)
            ),
            "summarize": lambda: F.summarize(sae, store),
            "trace per document": per_document,
        },
        repeats=args.repeats,
        warmup=1,
    )
    print(machine())
    print(f"{len(documents)} documents, {len(store)} tokens, {sae.config.d_sae} features")
    print_ratio_rows(times, "collect + summarize")


if __name__ == "__main__":
    main()
