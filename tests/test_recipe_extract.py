"""recipes/extract_embeds.py end to end on a tiny random Qwen3-VL and a tiny SigLIP.

- 2 gloo ranks stopped after one shard each, a simulated crash in the middle of an index
  append and another between a rename and its append, then a rerun: every record is stored
  exactly once, and equals (atol 1e-5) a single-process extraction of the same file;
- the edit-format options (--t2i-mode, --disable-inverse, --language cn, --field mapping,
  --per-token) change what is stored the way the seed says;
- a dual encoder (SigLIP) is detected from the config and extracts too;
- a tiny Qwen-Image-Edit diffusers folder (tests/_tiny_edit.py): the stored prompt embeddings of
  edit rows with 0-3 source images (and inverse rows) equal what the pipeline's own call computes
  (atol 1e-6), --t2i-mode those of QwenImagePipeline (also batched, with its mask); 2 ranks,
  interrupted and resumed, store each record once; what a pipeline cannot encode is refused.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _recipes import load_script, torchrun
from _tiny_models import tiny_qwen3vl, tiny_siglip
from PIL import Image

from vembed_blocks.data.embed_store import EmbedStore, collate_embeddings, shard_name

extract = load_script("extract_embeds")
COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "yellow": (230, 210, 40)}


def edit_rows(root: Path, n: int = 9) -> Path:
    """Edit rows with 0, 1 and 2 source images (renamed columns ``src`` / ``tgt``), inverse text on some."""
    (root / "img").mkdir(parents=True)
    names = list(COLOURS)
    for i, (c, rgb) in enumerate(COLOURS.items()):
        Image.new("RGB", (40 + 8 * i, 48), rgb).save(root / "img" / f"{c}.png")
    rows = []
    for i in range(n):
        a, b = names[i % 4], names[(i + 1) % 4]
        src = [None, f"img/{a}.png", [f"img/{a}.png", f"img/{b}.png"]][i % 3]
        row = {
            "src": src,
            "tgt": f"img/{b}.png",
            "instruction": f"the {a} sky to {b}",
            "instruction_cn": f"{a} {b} sunset",
        }
        if i % 2:
            row["inverse_instruction"] = f"a photo of a {a} cat"
        rows.append(row)
    path = root / "edits.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("extract")
    return {"data": edit_rows(root), "vlm": tiny_qwen3vl(str(root / "qwen")), "root": root}


def args(setup, out, *extra) -> list[str]:
    return [
        "--data",
        str(setup["data"]),
        "--model",
        setup["vlm"],
        "--output",
        str(out),
        "--field",
        "source_image=src",
        "--field",
        "target_image=tgt",
        "--batch-size",
        "3",
        "--shard-size",
        "2",
        "--image-sample-size",
        "40",
        *extra,
    ]


def test_two_ranks_interrupted_and_rerun_store_each_record_once_equal_to_one_process(setup, tmp_path):
    out = tmp_path / "sharded"
    torchrun("extract_embeds", *args(setup, out, "--stop-after-shards", "1"))
    assert sorted(p.name for p in out.glob("shard-*")) == [shard_name(0, 0), shard_name(1, 0)]
    # a crash between rank 1's next rename and its index append: the shard exists, unindexed
    (out / shard_name(1, 0)).rename(out / shard_name(1, 1))
    (out / shard_name(1, 0)).write_bytes((out / shard_name(1, 1)).read_bytes())
    # a crash in the middle of rank 0's index append: a truncated last line
    with open(out / "index-00000.jsonl", "a") as f:
        f.write('{"id": "7.0", "n": 1')
    torchrun("extract_embeds", *args(setup, out))

    single = tmp_path / "single"
    result = extract.main(args(setup, single))
    a, b = EmbedStore(out), EmbedStore(single)
    # 9 rows, 6 with source images, 3 of those with inverse text -> 9 forward + 3 inverse records
    assert result["records"] == len(b) == 12
    assert a.ids == b.ids and len(set(a.ids)) == 12
    lines = [json.loads(x) for p in sorted(out.glob("index-*.jsonl")) for x in p.read_text().splitlines()]
    assert sorted(r["id"] for r in lines) == sorted(a.ids)  # no duplicated index line
    assert (
        sorted(r["n"] % 2 for r in lines if r["shard"].startswith("shard-00001-")) == [1] * 6
    )  # rank 1 took records 1::2
    for i in range(len(a)):
        for side in ("query", "positive"):
            assert torch.allclose(a[i][side], b[i][side], atol=1e-5), (a.ids[i], side)
    assert a[0]["query"].shape == (32,)
    inverse = [b.info(i) for i in range(len(b)) if b.info(i)["inverse"]]
    assert [r["id"] for r in inverse] == ["2.1", "6.1", "8.1"]  # lines 2, 6 and 8: source image + inverse text
    assert b.groups.tolist()[:4] == [0, 1, 1, 2]
    meta = json.loads((out / "meta.json").read_text())
    assert meta["kind"] == "vlm" and meta["world_size"] == 2
    with pytest.raises(Exception, match="other settings"):
        extract.main(args(setup, single, "--disable-inverse"))  # one directory, one set of options


def test_options_t2i_inverse_language_per_token(setup, tmp_path):
    t2i = extract.main(args(setup, tmp_path / "t2i", "--t2i-mode"))
    assert t2i["records"] == 9
    store = EmbedStore(tmp_path / "t2i")
    assert store.groups.tolist() == [0, 1, 2] * 3  # the grouping keeps the row's source count

    extract.main(args(setup, tmp_path / "cn", "--disable-inverse", "--language", "cn"))
    extract.main(args(setup, tmp_path / "en", "--disable-inverse"))
    cn, plain = EmbedStore(tmp_path / "cn"), EmbedStore(tmp_path / "en")
    assert len(cn) == len(plain) == 9
    assert torch.allclose(cn[0]["positive"], plain[0]["positive"], atol=1e-5)  # same target image
    assert not torch.allclose(cn[0]["query"], plain[0]["query"], atol=1e-3)  # other instruction text

    extract.main(args(setup, tmp_path / "tok", "--disable-inverse", "--per-token"))
    tok = EmbedStore(tmp_path / "tok")
    q = tok[1]["query"]  # [tokens, 32], padding dropped; its last token is the pooled embedding
    assert q.dim() == 2 and q.shape[1] == 32 and tok[1]["query"].shape[0] != tok[0]["query"].shape[0]
    assert torch.allclose(q[-1], plain[1]["query"], atol=1e-5)


def test_dual_encoder_siglip_is_detected(setup, tmp_path):
    siglip = tiny_siglip(str(tmp_path / "siglip"))
    out = tmp_path / "siglip_out"
    result = extract.main(
        [
            "--data",
            str(setup["data"]),
            "--model",
            siglip,
            "--output",
            str(out),
            "--field",
            "source_image=src",
            "--field",
            "target_image=tgt",
            "--t2i-mode",
            "--batch-size",
            "4",
            "--shard-size",
            "4",
        ]
    )
    store = EmbedStore(out)
    assert result["records"] == len(store) == 9 and store.meta["kind"] == "dual_encoder"
    assert store[0]["query"].shape == store[0]["positive"].shape == (32,)
    with pytest.raises(SystemExit, match="per-token needs a VLM"):
        extract.main(["--data", str(setup["data"]), "--model", siglip, "--output", str(tmp_path / "x"), "--per-token"])


# ----------------------------------------------------------------------------- Qwen-Image-Edit folders
# The reference for every stored prompt embedding is diffusers' own pipeline: a real ``pipe(...)``
# call (for rows with source images) whose ``encode_prompt`` result is recorded, after which the
# call is cut short (the denoiser and VAE would only cost time); rows without images, which the
# pipeline's ``__call__`` refuses, are checked against ``encode_prompt`` directly.

EDIT_SOURCES = [0, 0, 1, 2, 3, 1, 2, 3]  # source images per row: the seed's 0..3
EDIT_PROMPTS = [
    "a cat sitting on the windowsill",
    "the sky",
    "turn the sky into sunset red",
    "merge two characters into one scene",
    "make the dog blue",
    "change the bird to green",
    "a photo of a cat and a dog",
    "turn the red circle white",
]
INVERSE_ROWS = {2: "a photo of a red sky", 4: "two dogs", 6: "a blue cat"}


class _Recorded(Exception):
    """Carries what ``encode_prompt`` returned out of an interrupted pipeline call."""


def pipeline_prompt_embeds(pipe, prompt: str, images: list) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(prompt_embeds[1, L, D], mask or None)`` exactly as ``pipe(image=images, prompt=prompt)`` computes them."""
    if not images and type(pipe).__name__ != "QwenImagePipeline":
        return pipe.encode_prompt(prompt, image=None)
    original = pipe.encode_prompt

    def record(*a, **kw):
        raise _Recorded(original(*a, **kw))

    pipe.encode_prompt = record
    try:
        single = type(pipe).__name__ == "QwenImageEditPipeline"  # takes one image, not a list
        kwargs = {"image": images[0] if single else images} if images else {}
        pipe(prompt=prompt, num_inference_steps=2, height=32, width=32, **kwargs)
    except _Recorded as r:
        return r.args[0]
    finally:
        del pipe.encode_prompt  # back to the class's method
    raise AssertionError("the pipeline never called encode_prompt")


def edit_rows_n_sources(root: Path) -> Path:
    """8 edit rows with 0, 0, 1, 2, 3, 1, 2, 3 source images of differing aspect ratios; inverse text on 3."""
    (root / "img").mkdir(parents=True)
    names = list(COLOURS)
    for i, (c, rgb) in enumerate(COLOURS.items()):
        Image.new("RGB", (40 + 24 * i, 48), rgb).save(root / "img" / f"{c}.png")
    rows = []
    for i, (n, prompt) in enumerate(zip(EDIT_SOURCES, EDIT_PROMPTS)):
        src = [f"img/{names[(i + k) % 4]}.png" for k in range(n)]
        row = {"source_image": src or None, "target_image": f"img/{names[(i + 3) % 4]}.png", "instruction": prompt}
        if i in INVERSE_ROWS:
            row["inverse_instruction"] = INVERSE_ROWS[i]
        rows.append(row)
    path = root / "edits.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def edit_args(data, folder, out, *extra) -> list[str]:
    return ["--data", str(data), "--model", folder, "--output", str(out), "--shard-size", "2", *extra]


@pytest.fixture(scope="module")
def edit_setup(tmp_path_factory) -> dict:
    pytest.importorskip("diffusers")
    from _tiny_edit import tiny_qwen_image_edit

    root = tmp_path_factory.mktemp("edit")
    data = edit_rows_n_sources(root)
    folder = tiny_qwen_image_edit(str(root / "qwen_image_edit"))
    single = root / "single"
    result = extract.main(edit_args(data, folder, single, "--batch-size", "4"))
    return {"data": data, "folder": folder, "single": single, "result": result, "root": root}


def _source_images(paths: list[str]) -> list:
    return [Image.open(p).convert("RGB") for p in paths]  # the test images are below the 512 px cap


def test_edit_folder_stores_the_edit_pipelines_prompt_embeds(edit_setup):
    from _tiny_edit import load_edit_processor
    from diffusers import QwenImageEditPlusPipeline

    pipe = QwenImageEditPlusPipeline.from_pretrained(
        edit_setup["folder"], processor=load_edit_processor(edit_setup["folder"])
    )
    store = EmbedStore(edit_setup["single"])
    # 8 forward records + 3 inverse ones (rows 2, 4 and 6 have source images and inverse text)
    assert edit_setup["result"]["records"] == len(store) == 11
    assert store.sides == ("prompt_embeds",)
    meta = store.meta
    assert (meta["kind"], meta["pipeline"], meta["prompt_template_encode_start_idx"]) == (
        "qwen_image",
        "QwenImageEditPlusPipeline",
        64,
    )
    seen_counts = set()
    for i in range(len(store)):
        row, stored = store.info(i), store[i]["prompt_embeds"]
        line = int(row["id"].split(".")[0]) - 1
        raw = json.loads(edit_setup["data"].read_text().splitlines()[line])
        sources = [str(edit_setup["data"].parent / p) for p in raw["source_image"] or []]
        target = [str(edit_setup["data"].parent / raw["target_image"])]
        if row["inverse"]:
            assert (row["prompt"], row["source_images"], row["target_images"]) == (
                raw["inverse_instruction"],
                target,
                sources,
            )
        else:
            assert (row["prompt"], row["source_images"], row["target_images"]) == (
                raw["instruction"],
                sources,
                target,
            )
        assert row["num_source_images"] == len(sources)
        embeds, mask = pipeline_prompt_embeds(pipe, row["prompt"], _source_images(row["source_images"]))
        assert mask is None  # one prompt: every token real, so the stored [L, D] has no padding
        assert stored.dtype == torch.float32 and stored.shape == embeds.shape[1:], (row["id"], stored.shape)
        assert torch.allclose(stored, embeds[0], atol=1e-6), row["id"]
        seen_counts.add(len(row["source_images"]))
    assert seen_counts == {0, 1, 2, 3}
    # "Picture N: <image>" per source image: the same prompt grows with each image
    lengths = {len(store.info(i)["source_images"]): store[i]["prompt_embeds"].shape[0] for i in range(len(store))}
    assert lengths[0] < lengths[1] and store[0]["prompt_embeds"].shape[1] == 32


def test_t2i_mode_stores_the_text_to_image_pipelines_embeds_and_masks(edit_setup, tmp_path):
    from diffusers import QwenImagePipeline

    out = tmp_path / "t2i"
    result = extract.main(edit_args(edit_setup["data"], edit_setup["folder"], out, "--t2i-mode", "--batch-size", "4"))
    store = EmbedStore(out)
    assert result["records"] == len(store) == 8  # no inverse records in t2i mode
    assert store.meta["pipeline"] == "QwenImagePipeline" and store.meta["prompt_template_encode_start_idx"] == 34
    assert store.groups.tolist() == EDIT_SOURCES  # the row's source count is kept for grouping
    pipe = QwenImagePipeline.from_pretrained(edit_setup["folder"])
    for i in range(len(store)):
        assert store.info(i)["source_images"] == []
        embeds, mask = pipeline_prompt_embeds(pipe, EDIT_PROMPTS[i], [])
        assert mask is None and torch.allclose(store[i]["prompt_embeds"], embeds[0], atol=1e-6), i
    # a batch of stored records, padded with their mask, is what encode_prompt gives for the batch
    batch = collate_embeddings([store[i] for i in range(len(store))])
    embeds, mask = pipe.encode_prompt(EDIT_PROMPTS)
    assert mask is not None and 0 < mask.sum() < mask.numel()  # prompts of different lengths
    assert torch.equal(batch["prompt_embeds_mask"], mask.bool())
    assert torch.allclose(batch["prompt_embeds"], embeds, atol=1e-6)


def test_edit_folder_two_ranks_interrupted_and_resumed_store_each_record_once(edit_setup, tmp_path):
    out = tmp_path / "sharded"
    data, folder = edit_setup["data"], edit_setup["folder"]
    torchrun("extract_embeds", *edit_args(data, folder, out, "--batch-size", "2", "--stop-after-shards", "1"))
    assert sorted(p.name for p in out.glob("shard-*")) == [shard_name(0, 0), shard_name(1, 0)]
    with open(out / "index-00000.jsonl", "a") as f:
        f.write('{"id": "5.0", "n": 4')  # a crash in the middle of an index append
    torchrun("extract_embeds", *edit_args(data, folder, out, "--batch-size", "2"))

    sharded, single = EmbedStore(out), EmbedStore(edit_setup["single"])
    lines = [json.loads(x) for p in sorted(out.glob("index-*.jsonl")) for x in p.read_text().splitlines()]
    assert sorted(r["id"] for r in lines) == sorted(single.ids) and len(lines) == 11  # every record once
    for rank in (0, 1):
        mine = [r["n"] for r in lines if r["shard"].startswith(f"shard-0000{rank}-")]
        assert mine and all(n % 2 == rank for n in mine)  # per-rank outputs: rank r holds records r::2
    assert sharded.ids == single.ids
    for i in range(len(single)):
        assert torch.allclose(sharded[i]["prompt_embeds"], single[i]["prompt_embeds"], atol=1e-6), single.ids[i]


def test_single_image_edit_pipeline_and_what_a_pipeline_cannot_encode(edit_setup, tmp_path):
    import shutil

    from _tiny_edit import load_edit_processor
    from diffusers import QwenImageEditPipeline

    from vembed_blocks.edit.prompts import load_prompt_pipeline, prompt_embeds

    one_image = tmp_path / "edit_v1"
    shutil.copytree(edit_setup["folder"], one_image)
    index = json.loads((one_image / "model_index.json").read_text())
    (one_image / "model_index.json").write_text(json.dumps({**index, "_class_name": "QwenImageEditPipeline"}))
    # the first Qwen-Image-Edit: one source image, resized to ~1024x1024 before encode_prompt
    image = Image.open(edit_setup["data"].parent / "img" / "blue.png").convert("RGB")
    stored = prompt_embeds(load_prompt_pipeline(str(one_image)), ["make the dog blue"], [[image]])[0]
    pipe = QwenImageEditPipeline.from_pretrained(one_image, processor=load_edit_processor(str(one_image)))
    embeds, mask = pipeline_prompt_embeds(pipe, "make the dog blue", [image])
    assert mask is None and stored.shape == embeds.shape[1:] and torch.allclose(stored, embeds[0], atol=1e-6)
    with pytest.raises(SystemExit, match=r"edits.jsonl:1: QwenImageEditPipeline takes 1 source image"):
        extract.main(edit_args(edit_setup["data"], str(one_image), tmp_path / "x"))
    (one_image / "model_index.json").write_text(json.dumps({**index, "_class_name": "QwenImagePipeline"}))
    with pytest.raises(ValueError, match="text-to-image folder"):
        extract.main(edit_args(edit_setup["data"], str(one_image), tmp_path / "y"))
    with pytest.raises(SystemExit, match="pipeline's own template"):
        extract.main(edit_args(edit_setup["data"], edit_setup["folder"], tmp_path / "z", "--doc-instruction", "x"))
