"""The tiny random Qwen-Image-Edit diffusers folder the tests build (no hub), re-exported from its block.

The builder lives in `vembed_blocks.demo.edit` (``recipes/edit_sft.py``'s bare run uses it too; a block
cannot import from tests/); see that module's docstring for the folder's layout. Tests import from here::

    from _tiny_edit import SCHEDULER_CONFIG, load_edit_processor, tiny_qwen_image_edit

Measured here (2 CPU cores): building the folder takes ~0.3 s once diffusers' pipelines are
imported (~6 s, paid by any test using them). A pipeline call needs ``num_inference_steps >= 2``
(with one step the real scheduler config's ``shift_terminal`` divides by zero: NaN images);
``pipe(image=img, prompt=..., num_inference_steps=2, height=32, width=32)`` returns a 32x32 image
in ~4 s, nearly all of it the VAE encoding each source image at the pipeline's fixed ~1024x1024.
"""

from __future__ import annotations

from vembed_blocks.demo.edit import (  # noqa: F401
    PROMPT_WORDS,
    SCHEDULER_CONFIG,
    SPECIALS,
    TEXT_WIDTH,
    VIDEO_CONFIG,
    load_edit_processor,
    tiny_qwen_image_edit,
    tiny_qwen_tokenizer,
)
