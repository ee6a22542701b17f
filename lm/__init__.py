"""lm: a from-scratch CS336 Transformer language model, its optimizer, data, training loop and tools."""

from lm.functional import cross_entropy, linear_cross_entropy, scaled_dot_product_attention, silu, softmax
from lm.model import (
    Embedding,
    Linear,
    MultiHeadSelfAttention,
    RMSNorm,
    RotaryPositionalEmbedding,
    SwiGLU,
    TransformerBlock,
    TransformerLM,
    count_parameters,
    flops_per_token,
)
from lm.optim import AdamW, clip_gradients, get_lr_cosine_schedule

__all__ = [
    "AdamW",
    "Embedding",
    "Linear",
    "MultiHeadSelfAttention",
    "RMSNorm",
    "RotaryPositionalEmbedding",
    "SwiGLU",
    "TransformerBlock",
    "TransformerLM",
    "clip_gradients",
    "count_parameters",
    "cross_entropy",
    "flops_per_token",
    "get_lr_cosine_schedule",
    "linear_cross_entropy",
    "scaled_dot_product_attention",
    "silu",
    "softmax",
]
