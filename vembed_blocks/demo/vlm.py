"""A tiny randomly initialised Qwen3-VL with an offline processor, for demos and tests (no hub).

``build_tiny_qwen3vl(out_dir, words)`` writes an HF folder laid out like a real Qwen3-VL one: the
model (``save_pretrained``), ``processor_config.json`` naming ``Qwen3VLProcessor`` with the Qwen2-VL
image processor settings, ``chat_template.jinja`` and a word-level tokenizer over ``words`` plus
the Qwen special tokens. It loads back through ``AutoModel.from_pretrained`` and
`vembed_blocks.vlm.load_vlm_processor` (no torchvision needed), the path real weights take.
"""

from __future__ import annotations

import json
import os
from typing import Iterable

import torch

from .shapes import word_level_tokenizer

__all__ = [
    "QWEN_SPECIALS",
    "QWEN_CHAT",
    "CHAT_WORDS",
    "word_level_tokenizer",
    "build_tiny_qwen3vl",
    "build_demo_qwen3vl",
    "build_demo_extractor",
]

QWEN_SPECIALS = ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
# The structure of Qwen3-VL's real chat template (system/user turns, an image placeholder per
# image, optional assistant prefix), without the tool-calling branches.
QWEN_CHAT = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CHAT_WORDS = ("system", "user", "assistant", "represent", "input")  # the chat roles and the default instruction


def _qwen3vl_config(vocab_size: int, ids: dict[str, int], width: int, layers: int, init_std: float) -> object:
    """A Qwen3-VL config: ``layers`` text layers of ``width`` (head dim 16), one vision block with 16 px
    patches merged 2x2 (so a 32 px image side is one image token)."""
    from transformers import Qwen3VLConfig

    heads = max(1, width // 16)
    return Qwen3VLConfig(
        text_config=dict(
            vocab_size=vocab_size,
            hidden_size=width,
            intermediate_size=2 * width,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=max(1, heads // 2),
            head_dim=16,
            max_position_embeddings=512,
            initializer_range=init_std,
            # mrope_section splits head_dim/2 = 8 rotary pairs over (time, height, width)
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 10000.0,
                "mrope_section": [2, 3, 3],
                "mrope_interleaved": True,
            },
        ),
        vision_config=dict(
            depth=1,
            hidden_size=width,
            intermediate_size=2 * width,
            num_heads=heads,
            patch_size=16,
            spatial_merge_size=2,
            temporal_patch_size=2,
            out_hidden_size=width,
            num_position_embeddings=64,
            deepstack_visual_indexes=[0],
            initializer_range=init_std,
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )


def build_tiny_qwen3vl(
    out_dir: str,
    words: Iterable[str],
    layers: int = 1,
    width: int = 32,
    max_side: int = 64,
    seed: int = 0,
    init_std: float = 0.02,
) -> str:
    """Save a random ``Qwen3VLModel`` + processor folder to ``out_dir`` and return it.

    Text: ``layers`` decoder layers of width ``width`` (a multiple of 16), vocabulary ``words`` +
    `CHAT_WORDS` + the Qwen specials. Vision: one block; images are resized to 32..``max_side`` px
    a side (multiples of 32), i.e. 1..(max_side/32)^2 image tokens of ``width`` each. ``seed`` seeds
    the initialisation (the same folder every time). The folder is loaded back once before returning,
    so a folder that cannot load fails here."""
    if width % 16 or width < 16:
        raise ValueError(f"build_tiny_qwen3vl: width must be a positive multiple of 16, got {width}")
    if max_side % 32 or max_side < 32:
        raise ValueError(f"build_tiny_qwen3vl: max_side must be a positive multiple of 32, got {max_side}")
    from transformers import Qwen3VLModel
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from ..vlm import load_vlm_processor, qwen_vl_processor

    tok = word_level_tokenizer(
        (*words, *CHAT_WORDS),
        ("[PAD]", "[UNK]", *QWEN_SPECIALS),
        eos_token="<|im_end|>",
        additional_special_tokens=list(QWEN_SPECIALS),
        model_max_length=512,
    )
    images = Qwen2VLImageProcessorPil(
        min_pixels=32 * 32, max_pixels=max_side * max_side, patch_size=16, merge_size=2, temporal_patch_size=2
    )
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIALS}
    with torch.random.fork_rng(devices=[]):  # the caller's RNG stream stays as it was (ranks stay in step)
        torch.manual_seed(seed)
        model = Qwen3VLModel(_qwen3vl_config(len(tok), ids, width, layers, init_std))
    model.save_pretrained(out_dir)
    qwen_vl_processor(tok, images, QWEN_CHAT).save_pretrained(out_dir)
    with open(os.path.join(out_dir, "processor_config.json")) as f:
        if json.load(f).get("processor_class") != "Qwen3VLProcessor":
            raise RuntimeError(f"{out_dir}/processor_config.json does not name Qwen3VLProcessor")
    load_vlm_processor(out_dir)
    return out_dir


def build_demo_qwen3vl(out_dir: str, quick: bool = False) -> str:
    """The demos' Qwen3-VL over the demo vocabulary (`vembed_blocks.demo.demo_words`): width 64, 2 text
    layers (``quick``: 32 and 1); images at 32 px, one image token each (the demo shapes are 48 px)."""
    from .shapes import demo_words

    width, layers = (32, 1) if quick else (64, 2)
    return build_tiny_qwen3vl(out_dir, demo_words(), layers=layers, width=width, max_side=32)


def build_demo_extractor(out_dir: str) -> str:
    """The extraction demos' frozen "embedder": the demo Qwen3-VL (width 64, 2 layers) with weights drawn at
    std 0.5 instead of 0.02. Why: at 0.02 the last token (always the assistant prefix) barely sees its context,
    and any two items' embeddings have cosine 0.999, too close for a head to separate; at 0.5 they spread out
    (mean cosine about 0.75) while still a function of the input, as a trained embedder's are."""
    from .shapes import demo_words

    return build_tiny_qwen3vl(out_dir, demo_words(), layers=2, width=64, max_side=32, init_std=0.5)
