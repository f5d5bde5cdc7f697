"""A toy image-caption dataset rendered with Pillow and a tiny random CLIP, for demos and tests.

``render_demo`` draws shapes x colours x positions on grey backgrounds with template
captions (a held-out validation render of every combination); ``build_tiny_clip`` saves a
small randomly initialised CLIP with a word-level tokenizer over the demo vocabulary. Both
write plain files (JSONL + PNG, an HF folder), read back through the same paths as user data.
"""

from __future__ import annotations

import json
import os
import random

import torch

__all__ = ["SHAPES", "COLOURS", "POSITIONS", "TEMPLATES", "render_demo", "build_tiny_clip"]

SHAPES = ["circle", "square", "triangle", "cross"]
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 210, 40),
    "purple": (150, 60, 190),
    "white": (245, 245, 245),
}
POSITIONS = {"left": (0.27, 0.5), "right": (0.73, 0.5), "top": (0.5, 0.27), "bottom": (0.5, 0.73), "center": (0.5, 0.5)}
TEMPLATES = ["a {c} {s} on the {p}", "a photo of a {c} {s} at the {p}", "{c} {s}, {p}", "there is a {c} {s} to the {p}"]


def render_demo(out_dir: str, per_combo: int, seed: int) -> tuple[str, str]:
    """Render shapes x colours x positions; train: ``per_combo`` images each, val: one new one each."""
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    os.makedirs(os.path.join(out_dir, "img"), exist_ok=True)
    files = {}
    for split, n in (("train", per_combo), ("val", 1)):
        rows = []
        for s in SHAPES:
            for c, rgb in COLOURS.items():
                for pos, (cx, cy) in POSITIONS.items():
                    for k in range(n):
                        size, grey = 48, rng.randint(60, 120)
                        img = Image.new("RGB", (size, size), (grey, grey, grey))
                        x, y, r = cx * size + rng.uniform(-3, 3), cy * size + rng.uniform(-3, 3), rng.uniform(6, 9)
                        draw, box = ImageDraw.Draw(img), [x - r, y - r, x + r, y + r]
                        if s == "circle":
                            draw.ellipse(box, fill=rgb)
                        elif s == "square":
                            draw.rectangle(box, fill=rgb)
                        elif s == "triangle":
                            draw.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=rgb)
                        else:
                            draw.rectangle([x - r, y - r / 3, x + r, y + r / 3], fill=rgb)
                            draw.rectangle([x - r / 3, y - r, x + r / 3, y + r], fill=rgb)
                        name = f"img/{split}_{s}_{c}_{pos}_{k}.png"
                        img.save(os.path.join(out_dir, name))
                        caption = rng.choice(TEMPLATES).format(c=c, s=s, p=pos)
                        rows.append({"query": caption, "positive": name})
        rng.shuffle(rows)
        files[split] = os.path.join(out_dir, f"{split}.jsonl")
        with open(files[split], "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    return files["train"], files["val"]


def build_tiny_clip(out_dir: str, quick: bool) -> str:
    """A random CLIP with a word-level tokenizer over the demo vocabulary, saved as an HF folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor, PreTrainedTokenizerFast
    from transformers.models.clip import CLIPImageProcessorPil

    words = sorted(
        {w for t in TEMPLATES for w in t.replace(",", " ").split() if "{" not in w}
        | set(SHAPES)
        | set(COLOURS)
        | set(POSITIONS)
        | {","}
    )
    vocab = {"[PAD]": 0, "[UNK]": 1, "[BOS]": 2, "[EOS]": 3, **{w: i + 4 for i, w in enumerate(words)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(
        single="[BOS] $A [EOS]", special_tokens=[("[BOS]", 2), ("[EOS]", 3)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        pad_token="[PAD]",
        unk_token="[UNK]",
        bos_token="[BOS]",
        eos_token="[EOS]",
        model_max_length=16,
    )
    images = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    width, layers = (32, 1) if quick else (64, 2)
    tower = dict(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers, num_attention_heads=4)
    config = CLIPConfig(
        text_config=dict(
            tower, vocab_size=len(vocab), max_position_embeddings=16, bos_token_id=2, eos_token_id=3, pad_token_id=0
        ),
        vision_config=dict(tower, image_size=32, patch_size=8),
        projection_dim=width,
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(out_dir)
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(out_dir)
    return out_dir
