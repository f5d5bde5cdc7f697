"""The edit demo's inputs: a tiny random Qwen-Image-Edit folder and rendered edit rows (seed 004, step 2).

``tiny_qwen_image_edit(out)`` writes a diffusers folder laid out like Qwen/Qwen-Image-Edit-2509 (no hub)::

    out/model_index.json     names QwenImageEditPlusPipeline and each component's class
    out/text_encoder/        Qwen2_5_VLForConditionalGeneration (width 32, 1 text layer, 1 vision block)
    out/tokenizer/           Qwen2Tokenizer: byte-level BPE with Qwen's pre-tokenizer, trained here on the
                             pipelines' prompt templates, so the template prefixes the pipelines drop are
                             64 (edit) and 34 (text-to-image) tokens, as with the real tokenizer
    out/processor/           Qwen2VLProcessor (that tokenizer + the PIL Qwen2-VL image processor,
                             14 px patches, images resized to 28..56 px a side)
    out/transformer/         QwenImageTransformer2DModel (2 layers, 2 heads of 16, joint_attention_dim 32)
    out/vae/                 AutoencoderKLQwenImage (z_dim 4, 8x spatial downsampling like the real one)
    out/scheduler/           FlowMatchEulerDiscreteScheduler with Qwen-Image's real config values

Each component loads with its own ``from_pretrained``, and the pipelines with theirs
(``QwenImageEditPlusPipeline.from_pretrained(out, processor=load_edit_processor(out))``). Without
torchvision ``Qwen2VLProcessor.from_pretrained`` fails on the video processor (the folder has the real
``video_preprocessor_config.json``, so where torchvision exists the plain ``from_pretrained(out)`` works):
``load_edit_processor`` rebuilds the processor without it.

``prepare_edit_demo(out_dir, quick=, seed=, ...)`` writes the edit demo's inputs: edit rows with 0-2 source
images (`vembed_blocks.demo.render_edit_demo`) under ``out_dir/rows/train`` and ``out_dir/rows/val`` and,
when asked, that folder under ``out_dir/model``; it returns their paths and where their embedding stores go.
Filling the stores (the extraction of the rows' prompt embeddings) is the caller's step.
"""

from __future__ import annotations

import json
import os
import shutil

import torch

from .shapes import render_edit_demo

__all__ = [
    "SCHEDULER_CONFIG",
    "tiny_qwen_tokenizer",
    "load_edit_processor",
    "tiny_qwen_image_edit",
    "DEMO_ROWS",
    "render_edit_rows",
    "prepare_edit_demo",
]


SPECIALS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
# Words the tests' prompts use (beyond the templates): each becomes one token.
PROMPT_WORDS = (
    "a an the of on in at to is there photo red green blue yellow purple white cat dog bird sky sunset "
    "change make turn into merge two characters one scene sitting windowsill Picture"
)
# Qwen-Image's scheduler/scheduler_config.json (the real values).
SCHEDULER_CONFIG = dict(
    base_image_seq_len=256,
    base_shift=0.5,
    invert_sigmas=False,
    max_image_seq_len=8192,
    max_shift=0.9,
    num_train_timesteps=1000,
    shift=1.0,
    shift_terminal=0.02,
    stochastic_sampling=False,
    time_shift_type="exponential",
    use_beta_sigmas=False,
    use_dynamic_shifting=True,
    use_exponential_sigmas=False,
    use_karras_sigmas=False,
)
TEXT_WIDTH = 32
VIDEO_CONFIG = dict(
    video_processor_type="Qwen2VLVideoProcessor",
    processor_class="Qwen2VLProcessor",
    patch_size=14,
    temporal_patch_size=2,
    merge_size=2,
    min_pixels=28 * 28,
    max_pixels=56 * 56,
)


def _require_diffusers() -> None:
    try:
        import diffusers  # noqa: F401
    except ImportError as e:
        raise ImportError('the tiny Qwen-Image-Edit folder needs diffusers: pip install "vembed-blocks[edit]"') from e


def _template_corpus() -> list[str]:
    """The three Qwen-Image pipelines' prompt templates and the test words, as training text."""
    import inspect

    _require_diffusers()
    from diffusers import QwenImageEditPipeline, QwenImageEditPlusPipeline, QwenImagePipeline

    texts = []
    for cls in (QwenImagePipeline, QwenImageEditPipeline, QwenImageEditPlusPipeline):
        bare = cls(**{name: None for name in list(inspect.signature(cls.__init__).parameters)[1:]})
        texts.append(bare.prompt_template_encode)
    words = PROMPT_WORDS.split()
    # each word at the start of a line (no leading space) and after a space, as prompts place them
    return texts + ["\n".join(words), " ".join(words), " ".join(w.capitalize() for w in words), "Picture 1: "]


def tiny_qwen_tokenizer():
    """A ``Qwen2Tokenizer`` whose byte-level BPE merges every word of the templates and test prompts
    into one token (any other text still encodes, byte by byte, as with the real one)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    corpus = _template_corpus()
    for special in SPECIALS:
        corpus = [t.replace(special, "\n") for t in corpus]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = Qwen2Tokenizer()._tokenizer.pre_tokenizer  # Qwen's split regex + byte level
    trainer = trainers.BpeTrainer(
        vocab_size=4096, min_frequency=1, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    bpe.train_from_iterator(corpus, trainer)
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    tok = Qwen2Tokenizer(vocab=model["vocab"], merges=merges, model_max_length=2048)
    tok.add_special_tokens({"additional_special_tokens": list(SPECIALS[1:])})
    return tok


def _text_encoder_config(tok):
    from transformers import Qwen2_5_VLConfig

    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIALS}
    return Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tok),
            hidden_size=TEXT_WIDTH,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=2048,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]},
            bos_token_id=ids["<|endoftext|>"],
            eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<|endoftext|>"],
        ),
        vision_config=dict(
            depth=1,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=TEXT_WIDTH,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=112,
            fullatt_block_indexes=[0],
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )


def _image_processor():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(
        min_pixels=28 * 28, max_pixels=56 * 56, patch_size=14, merge_size=2, temporal_patch_size=2
    )


def load_edit_processor(folder: str):
    """``<folder>/processor`` as a Qwen2VLProcessor, without torchvision (see ``vembed_blocks.vlm``)."""
    from ..vlm import load_vlm_processor

    return load_vlm_processor(os.path.join(folder, "processor"))


def tiny_qwen_image_edit(out: str) -> str:
    """Write the tiny Qwen-Image-Edit(-Plus) diffusers folder described in the module docstring; return ``out``.

    Seeds the global RNG (``torch.manual_seed(0)``) so that the weights are the same on every call."""
    _require_diffusers()
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLForConditionalGeneration

    from ..vlm import qwen_vl_processor

    os.makedirs(out, exist_ok=True)
    tok = tiny_qwen_tokenizer()
    tok.save_pretrained(os.path.join(out, "tokenizer"))
    qwen_vl_processor(tok, _image_processor(), processor_class="Qwen2VLProcessor").save_pretrained(
        os.path.join(out, "processor")
    )
    # The real folder's video-processor settings, so that where torchvision exists the plain
    # Qwen2VLProcessor.from_pretrained (and the pipeline's from_pretrained) loads this folder too.
    with open(os.path.join(out, "processor", "video_preprocessor_config.json"), "w") as f:
        json.dump(VIDEO_CONFIG, f, indent=2)
    torch.manual_seed(0)
    Qwen2_5_VLForConditionalGeneration(_text_encoder_config(tok)).save_pretrained(os.path.join(out, "text_encoder"))
    QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=16,
        out_channels=4,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=TEXT_WIDTH,
        axes_dims_rope=(4, 6, 6),
    ).save_pretrained(os.path.join(out, "transformer"))
    AutoencoderKLQwenImage(
        base_dim=4,
        z_dim=4,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
        latents_mean=[0.0] * 4,
        latents_std=[1.0] * 4,
    ).save_pretrained(os.path.join(out, "vae"))
    FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG).save_pretrained(os.path.join(out, "scheduler"))
    index = {
        "_class_name": "QwenImageEditPlusPipeline",
        "_diffusers_version": "0.42.1",
        "processor": ["transformers", "Qwen2VLProcessor"],
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "Qwen2_5_VLForConditionalGeneration"],
        "tokenizer": ["transformers", "Qwen2Tokenizer"],
        "transformer": ["diffusers", "QwenImageTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKLQwenImage"],
    }
    with open(os.path.join(out, "model_index.json"), "w") as f:
        json.dump(index, f, indent=2)
    return out


# ----------------------------------------------------------------------------- the edit demo's inputs

# (train rows, validation rows) rendered for the demo, full and quick
DEMO_ROWS = {False: (60, 16), True: (12, 4)}


def render_edit_rows(out_dir: str, rows: int, seed: int) -> str:
    """``out_dir/edits.jsonl``: the first ``rows`` rows (at most 120, 0/1/2 source images mixed) of
    `render_edit_demo` ``(per_combo=1)``, whose rows are shuffled; 1-source rows carry an inverse instruction.
    The images of the rows left out are deleted."""
    if not 1 <= rows <= 120:
        raise ValueError(f"render_edit_rows: rows must be in [1, 120], got {rows}")
    path = render_edit_demo(out_dir, per_combo=1, seed=seed)
    with open(path) as f:
        kept = f.readlines()[:rows]
    with open(path, "w") as f:
        f.writelines(kept)
    used = set()
    for line in kept:
        row = json.loads(line)
        sources = row["source_image"] if isinstance(row["source_image"], list) else [row["source_image"]]
        used.update(os.path.basename(p) for p in [row["target_image"], *sources] if p)
    for name in set(os.listdir(os.path.join(out_dir, "img"))) - used:
        os.remove(os.path.join(out_dir, "img", name))
    return path


def prepare_edit_demo(
    out_dir: str,
    *,
    quick: bool,
    seed: int,
    rank: int,
    world: int,
    build_model: bool,
    fresh: bool,
) -> dict[str, str]:
    """Write the edit demo's inputs under ``out_dir`` on rank 0 (every rank then waits at a barrier; ``world`` > 1
    needs the process group) and return the paths, the same on every rank::

        {"train_rows":  out_dir/rows/train/edits.jsonl,  "train_store": out_dir/meta/edit,
         "val_rows":    out_dir/rows/val/edits.jsonl,    "val_store":   out_dir/val/edit,
         "model":       out_dir/model  (with build_model only)}

    The rows: `render_edit_rows`, `DEMO_ROWS` ``[quick]`` of them, the validation rows with ``seed + 1``. With
    ``build_model``, the tiny folder (`tiny_qwen_image_edit`). With ``fresh``, rank 0 first removes the two stores
    of an earlier demo (their ``meta.json`` may name another world size). The stores are only named here: filling
    them (the extraction of the rows' prompt embeddings) is the caller's step.
    """
    train_rows, val_rows = DEMO_ROWS[bool(quick)]
    paths = {
        "train_rows": os.path.join(out_dir, "rows", "train", "edits.jsonl"),
        "train_store": os.path.join(out_dir, "meta", "edit"),
        "val_rows": os.path.join(out_dir, "rows", "val", "edits.jsonl"),
        "val_store": os.path.join(out_dir, "val", "edit"),
    }
    if build_model:
        paths["model"] = os.path.join(out_dir, "model")
    if rank == 0:
        for store in (paths["train_store"], paths["val_store"]) if fresh else ():
            shutil.rmtree(store, ignore_errors=True)
        render_edit_rows(os.path.dirname(paths["train_rows"]), train_rows, seed)
        render_edit_rows(os.path.dirname(paths["val_rows"]), val_rows, seed + 1)
        if build_model:
            tiny_qwen_image_edit(paths["model"])
    if world > 1:
        torch.distributed.barrier()
    return paths
