"""vembed_blocks.encoder: every folder kind a recipe exports loads and embeds as the recipe evaluated it.

Each family is trained for 2 steps by its recipe (in-process, world size 1, tiny random models of the
real architectures), then:
- `load_encoder(final)` embeddings equal (atol 1e-5) the ones computed with the functions the recipe's
  `evaluate` calls, on the exported folder loaded the recipe's way (written out in this file);
- `Encoder.similarity` equals a float64 cosine / MaxSim written here;
- retrieval metrics from the encoder's scores equal the recipe's own final metrics;
- mixed calls (texts and images in one list, PIL images, text + image items) keep input order.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _recipes import load_script
from _tiny_models import tiny_bert, tiny_qwen3vl, tiny_siglip
from PIL import Image
from test_recipe_colbert import pets_dataset
from test_recipe_qwen3 import shapes_dataset
from test_towers import tiny_dinov2

from vembed_blocks.data import DualEncoderCollator, Item, TextCollator, VLMCollator, load_records
from vembed_blocks.embed import retrieval_set
from vembed_blocks.encoder import load_encoder
from vembed_blocks.encoder_families import detect_family
from vembed_blocks.metrics import retrieval_metrics

ATOL = 1e-5


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("encoder")
    (root / "shapes").mkdir()
    (root / "pets").mkdir()
    shapes_train, shapes_val = shapes_dataset(root / "shapes")
    pets_train, pets_val = pets_dataset(root / "pets")
    return {
        "root": str(root),
        "shapes_train": shapes_train,
        "shapes_val": shapes_val,
        "pets_train": pets_train,
        "pets_val": pets_val,
        "bert": tiny_bert(str(root / "bert"), dropout=0.0),
        "qwen": tiny_qwen3vl(str(root / "qwen")),
    }


def run_recipe(name: str, out: Path, *flags: str) -> dict:
    common = ["--output", str(out), "--max-steps", "2", "--batch-size", "4", "--num-workers", "0", "--lr", "1e-3"]
    return load_script(name).main([*common, *flags])


def val_sides(path: str, fmt: str | None = None) -> tuple[list[Item], list[Item], list[set[int]]]:
    rs = retrieval_set(load_records(path, format=fmt))
    return rs.queries, rs.docs, rs.relevant


def cosine64(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = a.double(), b.double()
    return (a / a.norm(dim=1, keepdim=True)) @ (b / b.norm(dim=1, keepdim=True)).T


def maxsim64(a: tuple, b: tuple) -> torch.Tensor:
    """Per pair: each real token of a takes its best cosine over b's real tokens; the mean over a's tokens."""
    out = torch.empty(len(a[0]), len(b[0]), dtype=torch.float64)
    for i in range(len(a[0])):
        qa = a[0][i][a[1][i]].double()
        qa = qa / qa.norm(dim=1, keepdim=True)
        for j in range(len(b[0])):
            qb = b[0][j][b[1][j]].double()
            qb = qb / qb.norm(dim=1, keepdim=True)
            out[i, j] = (qa @ qb.T).max(dim=1).values.mean()
    return out


def check_single_vector(enc, reference, queries, docs, relevant, after: dict) -> None:
    """Embeddings = the recipe's, similarity = float64 cosine, metrics = the recipe's final metrics."""
    q, d = enc.encode(queries, is_query=True), enc.encode(docs, is_query=False)
    torch.testing.assert_close(q, reference(queries, True), atol=ATOL, rtol=0)
    torch.testing.assert_close(d, reference(docs, False), atol=ATOL, rtol=0)
    scores = enc.similarity(q, d)
    torch.testing.assert_close(scores.double(), cosine64(q, d), atol=ATOL, rtol=0)
    got = retrieval_metrics(scores, relevant)
    assert got == pytest.approx({k: after[k] for k in got}, abs=1e-6), (got, after)


# ----------------------------------------------------------------------------- dual encoders (clip_t2i)


def dual_reference(path: str):
    """What clip_t2i's evaluate computes, on the export loaded as the recipe loads a --model."""
    from vembed_blocks.towers import dual_encoder_features, load_dual_encoder, text_padding

    model, processor = load_dual_encoder(path)
    model.eval()
    collator = DualEncoderCollator(processor, **text_padding(model))

    @torch.no_grad()
    def encode(items, is_query):
        return F.normalize(dual_encoder_features(model, collator.encode(items, is_query)).float(), dim=-1)

    return encode


def test_clip_demo_export_and_mixed_items(tmp_path):
    out = tmp_path / "clip"
    result = run_recipe("clip_t2i", out, "--demo-quick")
    final = str(out / "final")
    enc = load_encoder(final, batch_size=7)  # batches that do not divide the sets
    assert enc.family == "dual" and not enc.multi_vector
    queries, docs, relevant = val_sides(str(out / "demo" / "val.jsonl"))
    check_single_vector(enc, dual_reference(final), queries, docs, relevant, result["after"])

    # One call with texts, PIL images, paths and a text + image (M2I) item, in input order.
    ref = dual_reference(final)
    image = docs[0].images[0]
    m2i = Item(text=queries[1].text, images=(docs[1].images[0],))
    mixed = enc.encode([queries[0].text, Image.open(image), {"image": docs[2].images[0]}, m2i], is_query=True)
    want = torch.cat([ref([queries[0]], True), ref([docs[0]], True), ref([docs[2]], True), ref([m2i], True)])
    torch.testing.assert_close(mixed, want, atol=ATOL, rtol=0)
    as_numpy = enc.encode_image(image, output="numpy")
    assert isinstance(as_numpy, np.ndarray) and as_numpy.shape == (1, want.shape[1])
    np.testing.assert_allclose(as_numpy[0], want[1].numpy(), atol=ATOL)
    assert isinstance(enc.similarity(as_numpy, as_numpy), np.ndarray)


def test_siglip_and_composed_towers(toy, tmp_path):
    siglip = tiny_siglip(str(tmp_path / "siglip"))
    dino = tiny_dinov2(str(tmp_path / "dino"))
    data = ["--data", toy["shapes_train"], "--val-data", toy["shapes_val"], "--format", "t2i"]
    queries, docs, relevant = val_sides(toy["shapes_val"], "t2i")
    for name, flags in (
        ("siglip", ["--model", siglip, "--loss", "siglip"]),
        ("composed", ["--vision-model", dino, "--text-model", toy["bert"], "--proj-dim", "16"]),
    ):
        result = run_recipe("clip_t2i", tmp_path / f"{name}-run", *data, *flags)  # not the model's own folder
        final = str(tmp_path / f"{name}-run" / "final")
        enc = load_encoder(final)
        assert enc.family == "dual", name
        check_single_vector(enc, dual_reference(final), queries, docs, relevant, result["after"])


# ----------------------------------------------------------------------------- text encoders (text_t2t, distill)


@pytest.mark.parametrize("recipe", ["text_t2t", "distill"])
def test_text_encoder_exports(toy, tmp_path, recipe):
    from vembed_blocks.text_encoder import load_text_encoder, unit_text_encoder

    flags = ["--model", toy["bert"], "--data", toy["pets_train"], "--val-data", toy["pets_val"]]
    flags += ["--query-prefix", "query ", "--pooling", "cls"]  # both must come back from the folder
    if recipe == "distill":
        flags += ["--teacher", toy["bert"]]
    result = run_recipe(recipe, tmp_path / "run", *flags)
    final = str(tmp_path / "run" / "final")
    enc = load_encoder(final)
    assert enc.family == "text" and enc.backend.settings["pooling"] == "cls"
    model, collator, cfg = load_text_encoder(final)  # what a next recipe run (or the recipe's evaluate) loads
    model.eval()
    assert collator.query_instruction == "query "
    reference = unit_text_encoder(model, collator, cfg)
    queries, docs, relevant = val_sides(toy["pets_val"], "t2t")
    check_single_vector(enc, reference, queries, docs, relevant, result["after"])
    with pytest.raises(ValueError, match="no image tower"):
        enc.encode_image([docs[0].text])


# ----------------------------------------------------------------------------- Qwen3-VL embedding (qwen3_fsdp)


def vlm_reference(path: str, query_instruction: str, doc_instruction: str | None):
    from transformers import AutoModel

    from vembed_blocks.vlm import load_vlm_processor, vlm_embed

    model = AutoModel.from_pretrained(path).eval()
    collator = VLMCollator(load_vlm_processor(path), query_instruction, doc_instruction, 1024)

    @torch.no_grad()
    def encode(items, is_query):
        return F.normalize(vlm_embed(model, collator.encode(items, is_query)).float(), dim=-1)

    return encode


def test_qwen3_embedding_export_with_its_instructions(toy, tmp_path):
    flags = ["--model", toy["qwen"], "--data", toy["shapes_train"], "--val-data", toy["shapes_val"]]
    flags += ["--format", "t2i", "--query-instruction", "represent the query", "--doc-instruction", "represent"]
    result = run_recipe("qwen3_fsdp", tmp_path / "run", *flags)
    final = str(tmp_path / "run" / "final")
    enc = load_encoder(final, batch_size=5)
    assert enc.family == "vlm"
    assert enc.backend.settings["query_instruction"] == "represent the query"  # from the export's vlm_embedding.json
    queries, docs, relevant = val_sides(toy["shapes_val"], "t2i")
    reference = vlm_reference(final, "represent the query", "represent")
    check_single_vector(enc, reference, queries, docs, relevant, result["after"])

    # The folder's vlm_embedding.json is what is read (edited here), an explicit instruction wins over it;
    # an image query is a one-image item.
    sidecar = Path(final) / "vlm_embedding.json"
    sidecar.write_text(json.dumps({**json.loads(sidecar.read_text()), "query_instruction": "represent the input"}))
    items = [queries[0], docs[0]]
    got = load_encoder(final).encode(items, is_query=True)
    torch.testing.assert_close(got, vlm_reference(final, "represent the input", "represent")(items, True))
    got = load_encoder(final, query_instruction="a photo").encode(items, is_query=True)
    torch.testing.assert_close(got, vlm_reference(final, "a photo", "represent")(items, True))


# ----------------------------------------------------------------------------- ColBERT / ColQwen (colbert)


def colbert_reference(recipe, path: str, args: argparse.Namespace):
    """The recipe's own token_embeddings (its evaluate's encode) on the export, loaded as its build loads it."""
    from safetensors.torch import load_file
    from transformers import AutoModel, AutoTokenizer

    from vembed_blocks.vlm import load_vlm_processor

    model = AutoModel.from_pretrained(path).eval()
    weight = load_file(str(Path(path) / "colbert_projection.safetensors"))["weight"]
    proj = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    proj.weight.data.copy_(weight)
    if args.encoder == "vlm":
        collator = VLMCollator(load_vlm_processor(path), args.query_instruction, args.doc_instruction, 1024)
    else:
        collator = TextCollator(AutoTokenizer.from_pretrained(path), 256, args.query_instruction, args.doc_instruction)
    parts = recipe.Parts(model, None, [], None, collator, None, proj)

    @torch.no_grad()
    def encode(items, is_query):
        inputs = collator.encode(items, is_query)
        tokens = recipe.token_embeddings(args, parts, inputs)
        return F.normalize(tokens.float(), dim=-1), inputs["attention_mask"].bool()

    return encode


def check_multi_vector(enc, reference, queries, docs, relevant, after) -> None:
    q, d = enc.encode(queries, is_query=True), enc.encode(docs, is_query=False)
    for got, items, is_query in ((q, queries, True), (d, docs, False)):
        tokens, mask = reference(items, is_query)
        assert got[1].shape == mask.shape and torch.equal(got[1], mask)
        torch.testing.assert_close(got[0], tokens, atol=ATOL, rtol=0)
    scores = enc.similarity(q, d)
    torch.testing.assert_close(scores.double(), maxsim64(q, d), atol=ATOL, rtol=0)
    got = retrieval_metrics(scores, relevant)
    assert got == pytest.approx({k: after[k] for k in got}, abs=1e-6), (got, after)


def test_colbert_text_and_colqwen_exports(toy, tmp_path):
    recipe = load_script("colbert")
    runs = {"text": ("bert", "pets", "t2t"), "vlm": ("qwen", "shapes", "t2i")}  # ColBERT, then ColQwen
    for kind, (model, data, fmt) in runs.items():
        out = tmp_path / kind
        flags = ["--model", toy[model], "--data", toy[f"{data}_train"], "--val-data", toy[f"{data}_val"]]
        result = run_recipe("colbert", out, *flags, "--format", fmt, "--dim", "16", "--query-instruction", "query ")
        enc = load_encoder(str(out / "final"), batch_size=5)
        assert enc.family == "colbert" and enc.multi_vector
        args = argparse.Namespace(encoder=kind, query_instruction="query ", doc_instruction=None)
        reference = colbert_reference(recipe, str(out / "final"), args)
        queries, docs, relevant = val_sides(toy[f"{data}_val"], fmt)
        check_multi_vector(enc, reference, queries, docs, relevant, result["after"])
    # ColQwen (the last run): a text query and a page image in one call, padded to the longer.
    tokens, mask = enc.encode([queries[0], docs[0]])
    for i, item in enumerate((queries[0], docs[0])):
        t, m = reference([item], True)
        assert torch.equal(mask[i, : m.shape[1]], m[0]) and not mask[i, m.shape[1] :].any()
        torch.testing.assert_close(tokens[i, : m.shape[1]], t[0], atol=ATOL, rtol=0)


# ----------------------------------------------------------------------------- an export describes itself


def test_copied_export_loads_with_its_own_settings(toy, tmp_path):
    """An export copied away from its run folder (no args.json beside it; a stale one one folder up
    instead) loads with the settings it was trained with (instructions or prefixes, max_length, pooling,
    max_image_side) and embeds exactly as in place; in place too only the folder's own files are read."""
    runs = {
        "vlm": ("qwen3_fsdp", "qwen", "shapes", "t2i", ["--query-instruction", "find this", "--max-image-side", "32"]),
        "colbert": (
            "colbert",
            "bert",
            "pets",
            "t2t",
            ["--dim", "16", "--query-instruction", "q: ", "--max-length", "12"],
        ),
        "text": ("text_t2t", "bert", "pets", "t2t", ["--query-prefix", "query ", "--pooling", "cls"]),
    }
    expected = {
        "vlm": {"query_instruction": "find this", "doc_instruction": None, "max_image_side": 32, "pooling": "last"},
        "colbert": {"query_instruction": "q: ", "max_length": 12, "encoder": "text", "dim": 16},
        "text": {"pooling": "cls", "prompts": {"query": "query "}},
    }
    for family, (recipe, model, data, fmt, extra) in runs.items():
        run = tmp_path / family
        flags = ["--model", toy[model], "--data", toy[f"{data}_train"], "--val-data", toy[f"{data}_val"]]
        run_recipe(recipe, run, *flags, *(["--format", fmt] if recipe != "text_t2t" else []), *extra)
        assert (run / "args.json").is_file()
        copy = tmp_path / "elsewhere" / family
        shutil.copytree(run / "final", copy)
        stale = {"query_instruction": "stale", "doc_instruction": "stale", "max_length": 3, "max_image_side": 8}
        (copy.parent / "args.json").write_text(json.dumps(stale))
        in_place, moved = load_encoder(str(run / "final")), load_encoder(str(copy))
        assert in_place.family == moved.family == family
        settings = {k: v for k, v in in_place.backend.settings.items() if k != "read_from"}
        assert settings == {k: v for k, v in moved.backend.settings.items() if k != "read_from"}
        assert {k: settings[k] for k in expected[family]} == expected[family], settings
        for enc in (in_place, moved):  # (a text folder's settings come from its sentence-transformers files)
            assert all("args.json" not in f for f in enc.backend.settings.get("read_from", [])), enc.backend.settings
        queries, docs, _ = val_sides(toy[f"{data}_val"], fmt)
        for items, is_query in ((queries[:4], True), (docs[:4], False)):
            a, b = in_place.encode(items, is_query), moved.encode(items, is_query)
            for x, y in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)):
                assert torch.equal(x, y)


# ----------------------------------------------------------------------------- detection and bad input


def test_unknown_folder_and_bad_items_are_named(toy, tmp_path):
    (tmp_path / "notes.txt").write_text("nothing")
    with pytest.raises(ValueError, match=r"cannot tell what .* holds.*colbert\.json.*modules\.json.*notes\.txt"):
        load_encoder(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="missing"):
        load_encoder(str(tmp_path / "missing"))
    assert detect_family(toy["bert"]) == "text" and detect_family(toy["qwen"]) == "vlm"
    enc = load_encoder(toy["bert"])
    with pytest.raises(TypeError, match=r"items\[1\] is a int"):
        enc.encode(["a cat", 3])
    with pytest.raises(ValueError, match=r"items\[0\] has neither text nor images"):
        enc.encode([{"text": None}])
    with pytest.raises(ValueError, match="only apply|do not apply"):
        load_encoder(toy["bert"], max_image_side=64)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text(json.dumps({"model_type": "bert"})[:-1])
    with pytest.raises(ValueError, match=r"bad/config\.json: not valid JSON"):
        load_encoder(str(tmp_path / "bad"))


def test_half_precision_weights_and_batch_size_do_not_change_the_result_beyond_rounding(toy):
    texts = ["the red cat", "a photo of a blue dog at the left", "green bird"]
    want = load_encoder(toy["bert"], batch_size=1).encode_text(texts).double()
    assert torch.allclose(load_encoder(toy["bert"], batch_size=2).encode_text(texts).double(), want, atol=ATOL)
    half = load_encoder(toy["bert"], dtype="bf16")
    assert next(half.model.parameters()).dtype == torch.bfloat16
    got = half.encode_text(texts)
    assert got.dtype == torch.float32 and (got.double() - want).abs().max() < 0.05
    with pytest.raises(ValueError, match="dtype must be one of"):
        load_encoder(toy["bert"], dtype="int8")
