"""Tiny randomly-initialised models of real architectures, saved as HF folders (no hub).

Each builder writes model + processor/tokenizer into ``out`` with ``save_pretrained`` and
returns the folder, so tests load them through the same ``from_pretrained`` path users take.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors

WORDS = ("a an the of on in at to is there photo red green blue yellow purple white cat dog bird "
         "circle square triangle cross left right top bottom center sky sunset query passage").split()  # fmt: skip


def word_tokenizer(words=WORDS, specials=("[PAD]", "[UNK]", "[BOS]", "[EOS]"), template: str | None = None, **kw):
    """A word-level fast tokenizer; ``template`` e.g. ``"[BOS] $A [EOS]"`` adds special tokens."""
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate([*specials, *dict.fromkeys(words), ",", "."])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    if template:
        used = [t for t in specials if t in template]
        tk.post_processor = processors.TemplateProcessing(single=template, special_tokens=[(t, vocab[t]) for t in used])
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="[PAD]", unk_token="[UNK]", **kw)


def tiny_bert(out: str, words=WORDS) -> str:
    """BertModel (2 layers, width 32) + a word-level tokenizer with [CLS]/[SEP]."""
    from transformers import BertConfig, BertModel

    tok = word_tokenizer(words, ("[PAD]", "[UNK]", "[CLS]", "[SEP]"), "[CLS] $A [SEP]", cls_token="[CLS]", sep_token="[SEP]",
                         model_max_length=64)  # fmt: skip
    config = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                        max_position_embeddings=64, pad_token_id=0)  # fmt: skip
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
    SiglipProcessor(image_processor=SiglipImageProcessorPil(size={"height": 32, "width": 32}), tokenizer=tok).save_pretrained(out)
    return out
