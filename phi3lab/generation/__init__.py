"""Generation: KV-cached, compiled, hookable and traceable.

Public names: `generate` (also `phi3lab.generate`), `Generation` (its
result), `Sampler` (how the next token is chosen), `estimate` (the memory a
generation with captures needs).
"""

from phi3lab.generation.decoding import estimate, generate
from phi3lab.generation.result import Generation
from phi3lab.generation.sampling import Sampler

__all__ = ["Generation", "Sampler", "estimate", "generate"]
