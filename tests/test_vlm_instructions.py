"""VLM chats laid out as the official Qwen3-VL-Embedding embedder lays them out (issue 27).

The rules, as read from the official embedder (``Qwen3VLEmbedder.format_model_input``):
- the instruction is stripped, then gets a final "." unless its last character is unicode punctuation
  (general category P*: ASCII . ? ! and also e.g. the ideographic full stop U+3002); symbols such as $ are not;
- it is the system turn; the default instruction is "Represent the user's input.";
- the user turn holds the image(s) first, then the text when non-empty (the text itself is not stripped);
- an item with neither text nor image sends the text "NULL".
Expected chats are written out below in the tiny template's syntax (`QWEN_CHAT`: the real template's
structure), with the assistant prefix the collator adds.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _tiny_models import word_tokenizer
from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from vembed_blocks.data.collate import VLMCollator, format_instruction
from vembed_blocks.data.images import load_images
from vembed_blocks.data.records import Item
from vembed_blocks.demo.vlm import CHAT_WORDS, QWEN_CHAT, QWEN_SPECIALS
from vembed_blocks.vlm import qwen_vl_processor

IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"


def _chat(system: str | None, user: str) -> str:
    """The rendered chat: optional system turn, the user turn, the assistant prefix."""
    head = f"<|im_start|>system\n{system}<|im_end|>\n" if system is not None else ""
    return f"{head}<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def processor():
    tok = word_tokenizer(
        ("red", "cat", *CHAT_WORDS), ("[PAD]", "[UNK]", *QWEN_SPECIALS), eos_token="<|im_end|>",
        additional_special_tokens=list(QWEN_SPECIALS),
    )  # fmt: skip
    ip = Qwen2VLImageProcessorPil(
        min_pixels=32 * 32, max_pixels=64 * 64, patch_size=16, merge_size=2, temporal_patch_size=2
    )
    return qwen_vl_processor(tok, ip, QWEN_CHAT)


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "a.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(path)
    return str(path)


def _rendered(collator: VLMCollator, item: Item, is_query: bool = True) -> str:
    """The chat text the collator tokenizes for ``item``."""
    instruction = collator.query_instruction if is_query else collator.doc_instruction
    messages = collator.message_fn(item, instruction)
    return collator.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


@pytest.mark.parametrize(
    "given, sent",
    [
        ("Find the matching image", "Find the matching image."),  # no final punctuation: "." added
        ("  Find the matching image  ", "Find the matching image."),  # stripped first
        ("Find the matching image.", "Find the matching image."),
        ("Which image matches?", "Which image matches?"),
        ("Find it!", "Find it!"),
        ("找到匹配的图片。", "找到匹配的图片。"),  # U+3002 ideographic full stop: punctuation (Po)
        ("Say «yes»", "Say «yes»"),  # U+00BB final quote: punctuation (Pf)
        ("Price in $", "Price in $."),  # $ is a currency symbol (Sc), not punctuation
        ("", None),
        ("   ", None),
        (None, None),
    ],
)
def test_format_instruction(given, sent):
    assert format_instruction(given) == sent


def test_instruction_is_the_system_turn_with_final_punctuation(processor):
    item = Item(text="red cat")
    assert _rendered(VLMCollator(processor), item) == _chat("Represent the user's input.", "red cat")  # default
    for given, sent in [
        ("Find the matching image", "Find the matching image."),
        ("Find the matching image.", "Find the matching image."),
        ("Which image matches?", "Which image matches?"),
        ("Find it!", "Find it!"),
        ("找到匹配的图片", "找到匹配的图片."),
        ("找到匹配的图片。", "找到匹配的图片。"),
    ]:
        assert _rendered(VLMCollator(processor, given), item) == _chat(sent, "red cat"), given
    both = VLMCollator(processor, "Find the matching image", "Represent the document")
    assert _rendered(both, item, is_query=False) == _chat("Represent the document.", "red cat")
    assert _rendered(VLMCollator(processor, None), item) == _chat(None, "red cat")  # ours: None = no system turn


def test_content_layout(processor, image):
    collator, system = VLMCollator(processor), "Represent the user's input."
    cases = [
        (Item(text="red cat"), "red cat"),  # text only
        (Item(text=" red cat "), " red cat "),  # the text is sent as is
        (Item(images=(image,)), IMAGE),  # image only
        (Item(text="", images=(image,)), IMAGE),  # empty text with an image: the image alone
        (Item(text="red cat", images=(image,)), IMAGE + "red cat"),  # image, then text
        (Item(text="red cat", images=(image, image)), IMAGE + IMAGE + "red cat"),
        (Item(text=""), "NULL"),  # neither text nor image: the placeholder
        (Item(text=None), "NULL"),
    ]
    for item, user in cases:
        assert _rendered(collator, item) == _chat(system, user), item


def test_encode_tokenizes_the_rendered_chat(processor, image):
    """What `encode` feeds the model is the processor's encoding of the expected chat (one row, no padding)."""
    system = "Find the matching image."
    collator = VLMCollator(processor, "Find the matching image")
    for item, user in [(Item(text=""), "NULL"), (Item(text="red cat", images=(image,)), IMAGE + "red cat")]:
        got = collator.encode([item], True)
        images = load_images(item.images) or None
        want = processor(text=[_chat(system, user)], images=images, return_tensors="pt")
        assert torch.equal(got["input_ids"], want["input_ids"]), item
