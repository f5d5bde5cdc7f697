"""recipes/extract_embeds.py end to end on a tiny random Qwen3-VL and a tiny SigLIP.

- 2 gloo ranks stopped after one shard each, a simulated crash in the middle of an index
  append and another between a rename and its append, then a rerun: every record is stored
  exactly once, and equals (atol 1e-5) a single-process extraction of the same file;
- the edit-format options (--t2i-mode, --disable-inverse, --language cn, --field mapping,
  --per-token) change what is stored the way the seed says;
- a dual encoder (SigLIP) is detected from the config and extracts too.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _recipes import load_script, torchrun
from _tiny_models import tiny_qwen3vl, tiny_siglip
from PIL import Image

from vembed_blocks.data.embed_store import EmbedStore, shard_name

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
