"""Keras 3 layers of the hookable Phi-3 model."""

from phi3lab.model.attention_paths import AttentionPaths
from phi3lab.model.backbone import Phi3Backbone
from phi3lab.model.kv_cache import KVCache
from phi3lab.model.rotary import RotarySpec

__all__ = ["AttentionPaths", "KVCache", "Phi3Backbone", "RotarySpec"]
