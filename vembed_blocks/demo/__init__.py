"""Recipe support, not blocks: demo data renderers and tiny random models for the recipes' no-argument runs and
the tests. No block imports this package.

- `shapes`: rendered shape/caption image sets, image pairs, edit rows; the word-level tokenizer; a tiny CLIP
- `text`: procedural text pairs with hard negatives and labels; a tiny BERT; an "ideal" teacher
- `vlm`: a tiny Qwen3-VL (the embedding demo and the extraction demo)
- `edit`: a tiny Qwen-Image-Edit diffusers folder (needs the ``edit`` extra)

The rendered-set names are re-exported here (``from vembed_blocks.demo import render_demo``).
"""

from .shapes import (
    COLOURS,
    EDIT_TEMPLATES,
    POSITIONS,
    SHAPES,
    TEMPLATES,
    build_tiny_clip,
    demo_words,
    render_colour_classes,
    render_demo,
    render_edit_demo,
    render_image_pairs,
    render_two_task_demo,
    word_level_tokenizer,
)

__all__ = [
    "COLOURS",
    "EDIT_TEMPLATES",
    "POSITIONS",
    "SHAPES",
    "TEMPLATES",
    "build_tiny_clip",
    "demo_words",
    "render_colour_classes",
    "render_demo",
    "render_edit_demo",
    "render_image_pairs",
    "render_two_task_demo",
    "word_level_tokenizer",
]
