"""towers.py: CLIP feature routing, composed DINOv2 + BERT towers, image-only towers, and the recipe training them.

Also covers clip_t2i's --eval-every and --grad-checkpointing, and evaluate.py on a composed export.
Image-only towers trained by clip_t2i and evaluated by evaluate.py: tests/test_recipe_evaluate.py.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from _recipes import load_script
from _tiny_models import tiny_bert

from vembed_blocks.demo import build_tiny_clip, render_demo
from vembed_blocks.towers import ComposedDualEncoder, compose_dual_encoder, dual_encoder_features, load_dual_encoder


def tiny_dinov2(out: str) -> str:
    from transformers import Dinov2Config, Dinov2Model
    from transformers.models.bit import BitImageProcessorPil

    torch.manual_seed(0)
    config = Dinov2Config(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64, image_size=32, patch_size=8
    )
    Dinov2Model(config).save_pretrained(out)
    BitImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def backbones(tmp_path_factory):
    root = tmp_path_factory.mktemp("towers")
    return tiny_dinov2(str(root / "dino")), tiny_bert(str(root / "bert"))


def test_composed_features_equal_backbones_plus_projections_and_round_trip(backbones, tmp_path):
    model, processor = compose_dual_encoder(*backbones, dim=8, text_pooling="mean")
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    text = processor.tokenizer(["a red cat", "the dog", "blue sky sunset"], padding=True, return_tensors="pt")
    with torch.no_grad():
        cls = model.vision(pixel_values=pixels).pooler_output  # DINOv2: layer-normed CLS
        want_img = cls @ model.vision_proj.weight.T
        hidden = model.text(**text).last_hidden_state
        m = text["attention_mask"].unsqueeze(-1).float()
        want_txt = ((hidden * m).sum(1) / m.sum(1)) @ model.text_proj.weight.T
        assert torch.allclose(model.get_image_features(pixel_values=pixels), want_img, atol=1e-6)
        assert torch.allclose(dual_encoder_features(model, dict(text)), want_txt, atol=1e-6)
        fused = dual_encoder_features(model, {**text, "pixel_values": pixels})
        assert torch.allclose(fused, F.normalize(want_txt, dim=-1) + F.normalize(want_img, dim=-1), atol=1e-6)

    model.save_pretrained(str(tmp_path / "c"))
    processor.save_pretrained(str(tmp_path / "c"))
    loaded, loaded_proc = load_dual_encoder(str(tmp_path / "c"))
    assert isinstance(loaded, ComposedDualEncoder) and loaded.dim == 8
    with torch.no_grad():
        assert torch.equal(
            loaded.eval().get_image_features(pixel_values=pixels), model.eval().get_image_features(pixel_values=pixels)
        )
    assert loaded_proc.tokenizer("a red cat")["input_ids"] == processor.tokenizer("a red cat")["input_ids"]


def test_image_only_towers_round_trip_and_refuse_text(backbones, tmp_path):
    from safetensors.torch import load_file

    from vembed_blocks.data import DualEncoderCollator, Item

    model, processor = compose_dual_encoder(backbones[0], None, dim=8)
    assert not model.has_text and model.text_proj is None and not processor.has_text
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model.vision(pixel_values=pixels).pooler_output @ model.vision_proj.weight.T
        assert torch.allclose(dual_encoder_features(model, {"pixel_values": pixels}), want, atol=1e-6)
    with pytest.raises(ValueError, match="image-only encoder"):
        model.get_text_features(input_ids=torch.tensor([[1, 2]]), attention_mask=torch.ones(1, 2))
    with pytest.raises(ValueError, match="image-only composed encoder.*--format i2i"):  # text reaching the collator
        DualEncoderCollator(processor).encode([Item(text="a red cat")], is_query=True)

    out = tmp_path / "c"
    model.save_pretrained(str(out))
    processor.save_pretrained(str(out))
    assert not (out / "text").exists() and (out / "vision" / "preprocessor_config.json").exists()
    assert set(load_file(str(out / "projections.safetensors"))) == {"vision_proj.weight"}
    assert json.loads((out / "composed_dual_encoder.json").read_text())["has_text"] is False
    loaded, loaded_proc = load_dual_encoder(str(out))
    assert isinstance(loaded, ComposedDualEncoder) and not loaded.has_text and not loaded_proc.has_text
    with torch.no_grad():
        want = model.eval().get_image_features(pixel_values=pixels)
        assert torch.equal(loaded.eval().get_image_features(pixel_values=pixels), want)
    collated = DualEncoderCollator(loaded_proc).encode([Item(images=(_png(tmp_path),))], is_query=True)
    assert collated["pixel_values"].shape == (1, 3, 32, 32)

    # A folder whose marker and contents disagree is named, not half-loaded.
    (out / "text").mkdir()
    with pytest.raises(ValueError, match="has_text=False but the text/ folder is present"):
        load_dual_encoder(str(out))


def _png(folder) -> str:
    from PIL import Image

    path = str(folder / "x.png")
    Image.new("RGB", (40, 36), (200, 30, 30)).save(path)
    return path


def test_dual_encoder_features_on_clip(tmp_path):
    from transformers import CLIPModel

    model = CLIPModel.from_pretrained(build_tiny_clip(str(tmp_path / "clip"), quick=True)).eval()
    ids = torch.tensor([[2, 5, 6, 3]])
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(
            dual_encoder_features(model, {"input_ids": ids}), model.get_text_features(input_ids=ids).pooler_output
        )
        assert torch.equal(
            dual_encoder_features(model, {"pixel_values": pixels}),
            model.get_image_features(pixel_values=pixels).pooler_output,
        )
    with pytest.raises(ValueError, match="need pixel_values or input_ids"):
        dual_encoder_features(model, {"attention_mask": ids})


def test_recipe_trains_composed_towers_with_eval_every_and_checkpointing(backbones, tmp_path):
    clip_t2i, evaluate = load_script("clip_t2i"), load_script("evaluate")
    train, val = render_demo(str(tmp_path / "demo"), per_combo=1, seed=0)
    out = tmp_path / "run"
    result = clip_t2i.main(
        [
            "--vision-model",
            backbones[0],
            "--text-model",
            backbones[1],
            "--proj-dim",
            "16",
            "--data",
            train,
            "--val-data",
            val,
            "--output",
            str(out),
            "--max-steps",
            "4",
            "--batch-size",
            "16",
            "--lr",
            "1e-3",
            "--chunk-size",
            "6",
            "--eval-every",
            "2",
            "--grad-checkpointing",
            "--num-workers",
            "0",
        ]
    )
    assert len(result["losses"]) == 4 and all(map(torch.isfinite, torch.tensor(result["losses"])))
    evals = [json.loads(line) for line in (out / "eval_log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [2]
    got = evaluate.main(["--model", str(out / "final"), "--data", val, "--output", str(tmp_path / "eval")])
    for name, value in result["after"].items():
        assert got[name] == pytest.approx(value, abs=1e-6), name


def test_text_padding_decided_by_model_type(tmp_path):
    from transformers import CLIPConfig, SiglipConfig

    from vembed_blocks.towers import text_padding

    class Fake:
        def __init__(self, config):
            self.config = config

    assert text_padding(Fake(SiglipConfig())) == {"max_length": 64, "padding": "max_length"}
    assert text_padding(Fake(CLIPConfig())) == {"max_length": 77, "padding": True}
    assert text_padding(object()) == {"max_length": 77, "padding": True}  # composed towers: no HF config


def test_temperature_means_logits_divided_by_it_for_infonce_and_siglip():
    import math

    import pytest

    from vembed_blocks.towers import contrastive_loss_for

    model = torch.nn.Module()
    model.logit_scale = torch.nn.Parameter(torch.tensor(math.log(20.0)))
    a, b = torch.nn.functional.normalize(torch.randn(4, 8, dtype=torch.float64), dim=-1), torch.randn(4, 8)
    b = torch.nn.functional.normalize(b.double(), dim=-1)
    for kind in ("infonce", "siglip"):
        loss = contrastive_loss_for(model, kind, temperature=0.1).double()
        assert math.exp(float(loss.log_scale.detach())) == pytest.approx(10.0)  # 1 / 0.1 scales cosines, both
    siglip = contrastive_loss_for(model, "siglip", temperature=0.1).double()
    z = 2 * torch.eye(4, dtype=torch.float64) - 1
    ref = -torch.nn.functional.logsigmoid(z * ((a @ b.T) / 0.1 + float(siglip.bias.detach()))).sum() / 4
    torch.testing.assert_close(siglip(a, b), ref)
    default = contrastive_loss_for(model, "infonce")  # None: the model's own (logit_scale = log 20)
    assert math.exp(float(default.log_scale.detach())) == pytest.approx(20.0)
    for bad in (0.0, -0.5):
        with pytest.raises(ValueError, match="temperature must be > 0"):
            contrastive_loss_for(model, "siglip", temperature=bad)


def test_a_clip_folder_as_the_vision_backbone_uses_its_vision_tower(tmp_path, caplog, capfd):
    """CLIP's vision tower, weights as trained (equal to the full model's), without transformers' report listing
    the text tower's weights as UNEXPECTED; the towers built on it save and load back."""
    import logging

    from transformers import CLIPModel

    clip = build_tiny_clip(str(tmp_path / "clip"), quick=True)
    capfd.readouterr()
    with caplog.at_level(logging.INFO, logger="vembed_blocks.towers"):
        model, processor = compose_dual_encoder(clip, None, dim=8)
    assert type(model.vision).__name__ == "CLIPVisionModel" and not model.has_text
    assert f"--vision-model {clip}: using its vision tower (CLIPVisionModel)" in caplog.text
    assert "LOAD REPORT" not in capfd.readouterr().err
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = CLIPModel.from_pretrained(clip).eval().vision_model(pixel_values=pixels).pooler_output
        assert torch.equal(model.vision.eval()(pixel_values=pixels).pooler_output, want)
        model.save_pretrained(str(tmp_path / "towers"))
        processor.save_pretrained(str(tmp_path / "towers"))
        loaded, _ = load_dual_encoder(str(tmp_path / "towers"))
        got = loaded.eval().get_image_features(pixel_values=pixels)
        assert torch.equal(got, model.eval().get_image_features(pixel_values=pixels))
