"""Draw the shipped model's name-mover circuit as found by EAP-IG and pruned
(run by hand; writes `docs/images/tiny_circuit.png`).

    .venv/bin/python scripts/draw_tiny_circuit.py [--out docs/images/tiny_circuit.png] [--prompts 24]

Held-out names in both orders (training templates), the name swap as the
corruption, EAP-IG (16 steps) at level "heads+mlps", the top 10% of edges
pruned by exact edge patching (`phi3lab.circuits.prune`, tolerance 0.05),
drawn by `CircuitView`'s static picture (PNG, or SVG for an `.svg` path).
It prints the faithfulness of both circuits.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import phi3lab
import phi3lab.circuits as C
from phi3lab import tasks
from phi3lab.widgets import CircuitView

PRESET = "phi3lab_tiny_en"


def pruned_circuit(model, tokenizer, count: int, seed: int) -> tuple[C.Circuit, float, float]:
    """`(pruned circuit, faithfulness of the top 10%, faithfulness pruned)`."""
    prompts = tasks.name_mover_prompts(count, seed=seed)  # held-out names, both orders
    clean = tasks.name_mover_batch(tokenizer, prompts)
    corrupted = tasks.name_mover_batch(tokenizer, prompts, corrupted="swap")
    metric = dict(answer=clean.answer, counterfactual=clean.counterfactual, padding_mask=clean.padding_mask)
    pair = (clean.token_ids, corrupted.token_ids)
    scores = C.edge_attribution(model, *pair, level="heads+mlps", method="eap-ig", steps=16, **metric)
    top = scores.top(int(0.1 * len(scores)))
    pruned = C.prune(model, top, *pair, tolerance=0.05, **metric)
    return pruned, C.faithfulness(model, top, *pair, **metric), C.faithfulness(model, pruned, *pair, **metric)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/images/tiny_circuit.png"))
    parser.add_argument("--prompts", type=int, default=24)
    parser.add_argument("--seed", type=int, default=21)
    args = parser.parse_args()
    model = phi3lab.Phi3Backbone.from_preset(PRESET)
    tokenizer = phi3lab.Phi3Tokenizer.from_preset(PRESET)
    pruned, top_kept, pruned_kept = pruned_circuit(model, tokenizer, args.prompts, args.seed)
    title = f"phi3lab_tiny_en name movers: EAP-IG, pruned to {len(pruned)} edges (faithfulness {pruned_kept:.2f})"
    view = CircuitView(pruned, edges=len(pruned), title=title)
    if args.out.suffix == ".svg":
        args.out.write_text(view.static("svg"))
    else:
        args.out.write_bytes(view.static("png"))
    print(f"top 10%: faithfulness {top_kept:.3f}; pruned to {len(pruned)} edges: {pruned_kept:.3f}")
    print(pruned.edges.to_string())
    print(f"wrote {args.out} ({args.out.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()
