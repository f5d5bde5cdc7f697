"""Toy image data sets rendered with Pillow and a tiny random CLIP, for demos and tests.

``render_demo`` draws shapes x colours x positions on grey backgrounds with template
captions (a held-out validation render of every combination); ``render_image_pairs`` two
renders of each combination (I2I); ``render_edit_demo`` edit rows (seed-004 format) with 0, 1
or 2 source images; ``build_tiny_clip`` saves a small randomly initialised CLIP with a
word-level tokenizer over the demo vocabulary (``demo_words``). All write plain files (JSONL +
PNG, an HF folder), read back through the same paths as user data.
"""

from __future__ import annotations

import json
import os
import random
from typing import Iterable, Sequence

import torch

__all__ = [
    "SHAPES",
    "COLOURS",
    "POSITIONS",
    "TEMPLATES",
    "EDIT_TEMPLATES",
    "demo_words",
    "render_demo",
    "render_image_pairs",
    "render_edit_demo",
    "build_tiny_clip",
    "word_level_tokenizer",
]

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
# Edit instructions by number of source images: draw from text; recolour one image; recolour the
# first image's shape with the second image's colour. {c} is the target colour.
EDIT_TEMPLATES = {
    0: "draw a {c} {s} on the {p}",
    1: "make it {c}",
    2: "paint the first shape in the colour of the second",
}


def demo_words() -> list[str]:
    """Every word of the demo captions and edit instructions (a word-level tokenizer's vocabulary), sorted."""
    texts = [*TEMPLATES, *EDIT_TEMPLATES.values()]
    fixed = {w for t in texts for w in t.replace(",", " ").split() if "{" not in w}
    return sorted(fixed | set(SHAPES) | set(COLOURS) | set(POSITIONS))


def _draw_shape(rng: random.Random, shape: str, rgb: tuple[int, int, int], cx: float, cy: float) -> object:
    """A 48 px PIL image: ``shape`` in ``rgb`` centred near (``cx``, ``cy``) (fractions of the side), jittered
    position and radius on a random grey background (4 draws from ``rng``, always in this order)."""
    from PIL import Image, ImageDraw

    size, grey = 48, rng.randint(60, 120)
    img = Image.new("RGB", (size, size), (grey, grey, grey))
    x, y, r = cx * size + rng.uniform(-3, 3), cy * size + rng.uniform(-3, 3), rng.uniform(6, 9)
    draw, box = ImageDraw.Draw(img), [x - r, y - r, x + r, y + r]
    if shape == "circle":
        draw.ellipse(box, fill=rgb)
    elif shape == "square":
        draw.rectangle(box, fill=rgb)
    elif shape == "triangle":
        draw.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=rgb)
    else:
        draw.rectangle([x - r, y - r / 3, x + r, y + r / 3], fill=rgb)
        draw.rectangle([x - r / 3, y - r, x + r / 3, y + r], fill=rgb)
    return img


def _combos() -> list[tuple[str, str, str]]:
    """Every (shape, colour, position), in a fixed order."""
    return [(s, c, p) for s in SHAPES for c in COLOURS for p in POSITIONS]


def _save(out_dir: str, rng: random.Random, name: str, combo: tuple[str, str, str]) -> str:
    """Render ``combo`` to ``out_dir/img/name.png``; returns the path relative to ``out_dir``."""
    s, c, p = combo
    rel = f"img/{name}.png"
    _draw_shape(rng, s, COLOURS[c], *POSITIONS[p]).save(os.path.join(out_dir, rel))
    return rel


def _write_jsonl(path: str, rows: list[dict]) -> str:
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return path


def render_demo(out_dir: str, per_combo: int, seed: int) -> tuple[str, str]:
    """Render shapes x colours x positions; train: ``per_combo`` images each, val: one new one each."""
    rng = random.Random(seed)
    os.makedirs(os.path.join(out_dir, "img"), exist_ok=True)
    files = {}
    for split, n in (("train", per_combo), ("val", 1)):
        rows = []
        for s in SHAPES:
            for c, rgb in COLOURS.items():
                for pos, (cx, cy) in POSITIONS.items():
                    for k in range(n):
                        name = f"img/{split}_{s}_{c}_{pos}_{k}.png"
                        _draw_shape(rng, s, rgb, cx, cy).save(os.path.join(out_dir, name))
                        caption = rng.choice(TEMPLATES).format(c=c, s=s, p=pos)
                        rows.append({"query": caption, "positive": name})
        rng.shuffle(rows)
        files[split] = os.path.join(out_dir, f"{split}.jsonl")
        with open(files[split], "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    return files["train"], files["val"]


def render_image_pairs(out_dir: str, per_combo: int, seed: int) -> str:
    """I2I pairs: ``per_combo`` rows per shape x colour x position, each two independent renders of it
    (``{"query_image", "positive"}``, a label per combination). Returns ``out_dir/pairs.jsonl``."""
    rng = random.Random(seed)
    os.makedirs(os.path.join(out_dir, "img"), exist_ok=True)
    rows = []
    for combo in _combos():
        for k in range(per_combo):
            stem = "pair_" + "_".join(combo) + f"_{k}"
            query, positive = _save(out_dir, rng, stem + "_a", combo), _save(out_dir, rng, stem + "_b", combo)
            rows.append({"query_image": query, "positive": positive, "label": " ".join(combo)})
    rng.shuffle(rows)
    return _write_jsonl(os.path.join(out_dir, "pairs.jsonl"), rows)


def render_colour_classes(out_dir: str, per_combo: int, seed: int) -> tuple[str, str]:
    """A classification task over fresh renders: an image's class is its colour. I2T rows ``{"query_image",
    "positive": its colour, "negatives": the other colours}``; train: ``per_combo`` images per shape x colour x
    position, val: one. Other rows of a colour share its positive, so train it with in-batch negatives off.
    Returns ``(out_dir/colour_train.jsonl, out_dir/colour_val.jsonl)``."""
    rng = random.Random(seed + 1)  # not the retrieval set's images
    os.makedirs(os.path.join(out_dir, "img"), exist_ok=True)
    files = []
    for split, n in (("train", per_combo), ("val", 1)):
        rows = []
        for combo in _combos():
            for k in range(n):
                image = _save(out_dir, rng, f"cls_{split}_" + "_".join(combo) + f"_{k}", combo)
                rows.append(
                    {"query_image": image, "positive": combo[1], "negatives": sorted(set(COLOURS) - {combo[1]})}
                )
        rng.shuffle(rows)
        files.append(_write_jsonl(os.path.join(out_dir, f"colour_{split}.jsonl"), rows))
    return files[0], files[1]


def render_two_task_demo(out_dir: str, per_combo: int, seed: int, widths: tuple[int, ...] = (64, 32)) -> str:
    """Beside `render_demo`'s set (rendered first): `render_colour_classes` and ``out_dir/tasks.jsonl``, a task
    table (`vembed_blocks.task_table`) of caption retrieval and colour classification, the latter with in-batch
    negatives off (other rows of a colour share its positive), the other five colours as its negatives, its
    own temperature, instruction (words of the demo vocabulary) and Matryoshka ``widths`` (at most the model's)."""
    render_colour_classes(out_dir, per_combo, seed)
    retrieval = dict(name="retrieval", data="train.jsonl", val_data="val.jsonl", weight=2, batch_size=32)
    colour = dict(name="colour", data="colour_train.jsonl", val_data="colour_val.jsonl", batch_size=8)
    colour.update(in_batch_negatives=False, num_negatives=5, temperature=0.1, mrl_dims=list(widths))
    colour["query_instruction"] = "the colour of the shape"
    return _write_jsonl(os.path.join(out_dir, "tasks.jsonl"), [retrieval, colour])


def _edit_row(out_dir: str, rng: random.Random, i: int, sources: int, combo: tuple[str, str, str]) -> dict:
    """One edit row whose target is ``combo``, with ``sources`` (0, 1 or 2) source images."""
    s, c, p = combo
    other = rng.choice([k for k in COLOURS if k != c])  # the source's colour, before the edit
    row = {"source_image": None, "instruction": EDIT_TEMPLATES[sources].format(c=c, s=s, p=p)}
    if sources == 1:
        row["source_image"] = _save(out_dir, rng, f"edit_{i}_src", (s, other, p))
        row["inverse_instruction"] = EDIT_TEMPLATES[1].format(c=other)  # target -> source: a second record
    elif sources == 2:
        donor = (rng.choice(SHAPES), c, rng.choice(list(POSITIONS)))  # only its colour matters
        row["source_image"] = [
            _save(out_dir, rng, f"edit_{i}_src0", (s, other, p)),
            _save(out_dir, rng, f"edit_{i}_src1", donor),
        ]
    row["target_image"] = _save(out_dir, rng, f"edit_{i}_tgt", combo)
    return row


def render_edit_demo(out_dir: str, per_combo: int, seed: int) -> str:
    """Edit rows (seed-004 format): for each shape x colour x position target, ``per_combo`` rows with
    0, 1 and 2 source images in turn (`EDIT_TEMPLATES`); 1-source rows carry an inverse instruction.
    Returns ``out_dir/edits.jsonl``."""
    rng = random.Random(seed)
    os.makedirs(os.path.join(out_dir, "img"), exist_ok=True)
    jobs = [(combo, (j + k) % 3) for j, combo in enumerate(_combos()) for k in range(per_combo)]
    rng.shuffle(jobs)
    rows = [_edit_row(out_dir, rng, i, sources, combo) for i, (combo, sources) in enumerate(jobs)]
    return _write_jsonl(os.path.join(out_dir, "edits.jsonl"), rows)


def word_level_tokenizer(
    words: Iterable[str], specials: Sequence[str], template: str | None = None, punctuation: bool = True, **kwargs
) -> object:
    """A fast word-level tokenizer: ids ``specials``, then ``words`` (first occurrence), then (``punctuation``)
    ``","`` and ``"."``. The demos' and tests' tiny models all tokenize with it.

    ``template`` (e.g. ``"[BOS] $A [EOS]"``) adds special tokens around each text; ``kwargs`` go to
    ``PreTrainedTokenizerFast`` (``eos_token``, ``model_max_length``, ...). ``[PAD]``/``[UNK]`` must be in
    ``specials``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    missing = {"[PAD]", "[UNK]"} - set(specials)
    if missing:
        raise ValueError(f"word_level_tokenizer: specials must include {sorted(missing)}")
    vocab = {t: i for i, t in enumerate([*specials, *dict.fromkeys(words), *([",", "."] if punctuation else [])])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    if template:
        used = [t for t in specials if t in template]
        tk.post_processor = processors.TemplateProcessing(single=template, special_tokens=[(t, vocab[t]) for t in used])
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="[PAD]", unk_token="[UNK]", **kwargs)


def build_tiny_clip(out_dir: str, quick: bool) -> str:
    """A random CLIP with a word-level tokenizer over the demo vocabulary, saved as an HF folder."""
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor
    from transformers.models.clip import CLIPImageProcessorPil

    words = sorted(
        {w for t in TEMPLATES for w in t.replace(",", " ").split() if "{" not in w}
        | set(SHAPES)
        | set(COLOURS)
        | set(POSITIONS)
        | {","}
    )
    specials = ("[PAD]", "[UNK]", "[BOS]", "[EOS]")
    tokenizer = word_level_tokenizer(
        words, specials, "[BOS] $A [EOS]", punctuation=False, bos_token="[BOS]", eos_token="[EOS]", model_max_length=16
    )
    images = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    width, layers = (32, 1) if quick else (64, 2)
    tower = dict(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers, num_attention_heads=4)
    config = CLIPConfig(
        text_config=dict(
            tower, vocab_size=len(tokenizer), max_position_embeddings=16, bos_token_id=2, eos_token_id=3, pad_token_id=0
        ),
        vision_config=dict(tower, image_size=32, patch_size=8),
        projection_dim=width,
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(out_dir)
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(out_dir)
    return out_dir
