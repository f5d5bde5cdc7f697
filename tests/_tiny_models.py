"""Tiny randomly-initialised models of real architectures, saved as HF folders (no hub).

Each builder writes model + processor/tokenizer into ``out`` with ``save_pretrained`` and
returns the folder, so tests load them through the same ``from_pretrained`` path users take.
"""

from __future__ import annotations

import torch

from vembed_blocks.demo import word_level_tokenizer
from vembed_blocks.demo.vlm import build_tiny_qwen3vl

WORDS = (
    "a an the of on in at to is there photo red green blue yellow purple white cat dog bird "
    "circle square triangle cross left right top bottom center sky sunset query passage"
).split()


def word_tokenizer(words=WORDS, specials=("[PAD]", "[UNK]", "[BOS]", "[EOS]"), template: str | None = None, **kw):
    """A word-level fast tokenizer; ``template`` e.g. ``"[BOS] $A [EOS]"`` adds special tokens (the demos' builder)."""
    return word_level_tokenizer(words, specials, template, **kw)


def tiny_bert(out: str, words=WORDS, dropout: float = 0.1) -> str:
    """BertModel (2 layers, width 32, ``dropout`` in hidden states and attention) + a word-level
    tokenizer with [CLS]/[SEP]."""
    from transformers import BertConfig, BertModel

    tok = word_tokenizer(
        words,
        ("[PAD]", "[UNK]", "[CLS]", "[SEP]"),
        "[CLS] $A [SEP]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        model_max_length=64,
    )
    config = BertConfig(
        vocab_size=len(tok),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        pad_token_id=0,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    torch.manual_seed(0)
    BertModel(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def tiny_siglip(out: str, words=WORDS) -> str:
    """SiglipModel (1 layer per tower, 32 px images) + SiglipProcessor over a word-level tokenizer."""
    from transformers import SiglipConfig, SiglipModel, SiglipProcessor
    from transformers.models.siglip import SiglipImageProcessorPil

    tok = word_tokenizer(words, ("[PAD]", "[UNK]", "[EOS]"), "$A [EOS]", eos_token="[EOS]", model_max_length=64)
    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)
    config = SiglipConfig(
        text_config=dict(tower, vocab_size=len(tok), max_position_embeddings=64, pad_token_id=0, eos_token_id=2),
        vision_config=dict(tower, image_size=32, patch_size=8),
    )
    torch.manual_seed(0)
    SiglipModel(config).save_pretrained(out)
    SiglipProcessor(
        image_processor=SiglipImageProcessorPil(size={"height": 32, "width": 32}), tokenizer=tok
    ).save_pretrained(out)
    return out


def tiny_qwen3vl(out: str, words=WORDS, layers: int = 1) -> str:
    """Qwen3VLModel (width 32, ``layers`` text layers, 1 vision block, 16 px patches) + a processor folder laid
    out like a real Qwen3-VL one, built by the demos' `build_tiny_qwen3vl`; images are resized to 32..64 px a
    side (1..4 image tokens). Load the processor with ``vembed_blocks.vlm.load_vlm_processor``. The global RNG is
    seeded with 0 first, as the tests built on it expect."""
    torch.manual_seed(0)
    return build_tiny_qwen3vl(out, words, layers=layers)
