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
    compile_layers,
    count_parameters,
    flops_per_token,
)
from lm.optim import AdamW, clip_gradients, get_lr_cosine_schedule
from lm.tokenizer import ByteTokenizer, Tokenizer, load_tokenizer, train_bpe

__all__ = [
    "AdamW",
    "ByteTokenizer",
    "Embedding",
    "Linear",
    "MultiHeadSelfAttention",
    "RMSNorm",
    "RotaryPositionalEmbedding",
    "SwiGLU",
    "TransformerBlock",
    "TransformerLM",
    "Tokenizer",
    "clip_gradients",
    "compile_layers",
    "count_parameters",
    "cross_entropy",
    "flops_per_token",
    "get_lr_cosine_schedule",
    "linear_cross_entropy",
    "load_tokenizer",
    "scaled_dot_product_attention",
    "silu",
    "softmax",
    "train_bpe",
]
