"""Transformer building blocks shared by the aggregator and the heads."""

from .attention import Attention
from .block import Block
from .layer_scale import LayerScale
from .mlp import Mlp
from .patch_embed import PatchEmbed
from .rope import apply_rope, rope_tables, token_positions
from .vision_transformer import DinoVisionTransformer

__all__ = [
    "Attention",
    "Block",
    "DinoVisionTransformer",
    "LayerScale",
    "Mlp",
    "PatchEmbed",
    "apply_rope",
    "rope_tables",
    "token_positions",
]
