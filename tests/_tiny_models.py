"""Tiny randomly-initialised models of real architectures, saved as HF folders (no hub).

Each builder writes model + processor/tokenizer into ``out`` with ``save_pretrained`` and
returns the folder, so tests load them through the same ``from_pretrained`` path users take.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors

WORDS = (
    "a an the of on in at to is there photo red green blue yellow purple white cat dog bird "
    "circle square triangle cross left right top bottom center sky sunset query passage"
).split()


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


QWEN_SPECIALS = ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
# The structure of Qwen3-VL's real chat template (system/user turns, an image placeholder per
# image, optional assistant prefix), without the tool-calling branches.
QWEN_CHAT = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_qwen3vl(out: str, words=WORDS, layers: int = 1) -> str:
    """Qwen3VLModel (width 32, ``layers`` text layers, 1 vision block, 16 px patches) + a processor
    folder laid out like a real Qwen3-VL one (``processor_config.json`` naming Qwen3VLProcessor,
    the Qwen2-VL image processor settings, ``chat_template.jinja``, a word-level tokenizer with
    the Qwen special tokens). Images are resized to 32..64 px a side (1..4 image tokens).
    Load the processor with ``vembed_blocks.vlm.load_vlm_processor`` (no torchvision needed).
    """
    import json
    import os

    from transformers import Qwen3VLConfig, Qwen3VLModel

    from vembed_blocks.vlm import load_vlm_processor, qwen_vl_processor

    tok = word_tokenizer(
        (*words, "system", "user", "assistant", "represent", "input"),
        ("[PAD]", "[UNK]", *QWEN_SPECIALS),
        eos_token="<|im_end|>",
        additional_special_tokens=list(QWEN_SPECIALS),
        model_max_length=512,
    )
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    images = Qwen2VLImageProcessorPil(
        min_pixels=32 * 32, max_pixels=64 * 64, patch_size=16, merge_size=2, temporal_patch_size=2
    )
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIALS}
    config = Qwen3VLConfig(
        text_config=dict(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=layers,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=16,
            max_position_embeddings=512,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 10000.0,
                "mrope_section": [2, 3, 3],
                "mrope_interleaved": True,
            },
        ),
        vision_config=dict(
            depth=1,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            patch_size=16,
            spatial_merge_size=2,
            temporal_patch_size=2,
            out_hidden_size=32,
            num_position_embeddings=64,
            deepstack_visual_indexes=[0],
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(0)
    Qwen3VLModel(config).save_pretrained(out)
    qwen_vl_processor(tok, images, QWEN_CHAT).save_pretrained(out)
    with open(os.path.join(out, "processor_config.json")) as f:
        assert json.load(f)["processor_class"] == "Qwen3VLProcessor"
    load_vlm_processor(out)  # fail here, not in the test, if the folder does not load back
    return out
