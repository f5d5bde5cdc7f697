"""User mistakes end a run with one message, not a traceback; model folders are checked before anything loads.

- `report_user_errors` (run in a real interpreter, as a recipe's ``__main__`` block runs): a user error prints
  exactly ``error: <message>`` and one hint line and exits 2; ``--debug`` / ``VEMBED_DEBUG=1`` and any other
  exception keep the full traceback; torchrun ranks prefix their lines; a DataLoader worker's user error is
  unwrapped from the RuntimeError torch re-raises it as.
- `folder_kind` on folders saved by the real builders (tiny CLIP, BERT, sentence-transformers, Qwen3-VL,
  DINOv2, CLIP's vision half, composed towers, a ColBERT export, a LoRA adapter, a run folder) and non-models.
- `check_model_arg`'s exact messages, and the loaders (towers, text, VLM, `load_encoder`) raising them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from _tiny_models import tiny_bert, tiny_qwen3vl
from test_towers import tiny_dinov2

from vembed_blocks.model_folders import check_model_arg, config_kind, folder_kind, looks_like_hf_id
from vembed_blocks.user_errors import DEBUG_HINT, UserError, is_user_error, report_user_errors

# ----------------------------------------------------------------------------- report_user_errors

SCRIPT = """
import sys
from vembed_blocks.user_errors import UserError, report_user_errors

class Refused(RuntimeError):
    user_error = True

def main():
    print("loading", flush=True)
    raise {exc}

with report_user_errors():
    main()
"""


def run_script(tmp_path, exc: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    """``exc`` raised inside ``main()`` of a recipe-like script file, in a fresh interpreter; ``env`` added to ours."""
    full_env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "VEMBED_DEBUG")}
    script = tmp_path / "recipe.py"
    script.write_text(SCRIPT.format(exc=exc))
    return subprocess.run(
        [sys.executable, str(script), *args], capture_output=True, text=True, env={**full_env, **env}, timeout=120
    )


@pytest.mark.parametrize(
    "exc, message",
    [
        ('UserError("--model runs/x/final: no such folder")', "--model runs/x/final: no such folder"),
        ('FileNotFoundError("val.jsonl: no such file")', "val.jsonl: no such file"),
        ('Refused("a class that says user_error = True")', "a class that says user_error = True"),
    ],
)
def test_a_user_error_is_two_lines_and_exit_status_2(tmp_path, exc, message):
    done = run_script(tmp_path, exc)
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == [f"error: {message}", DEBUG_HINT]
    assert done.stdout == "loading\n"  # what the run printed before is kept


def test_a_multi_line_message_is_kept_and_nothing_else(tmp_path):
    done = run_script(tmp_path, 'UserError("--data x.jsonl: 3 bad rows\\n  line 5: no query\\n  line 9: no positive")')
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        "error: --data x.jsonl: 3 bad rows",
        "  line 5: no query",
        "  line 9: no positive",
        DEBUG_HINT,
    ]


@pytest.mark.parametrize("how", ["--debug", "VEMBED_DEBUG=1"])
def test_debug_shows_the_traceback(tmp_path, how):
    args, env = (["--debug"], {}) if how == "--debug" else ([], {"VEMBED_DEBUG": "1"})
    done = run_script(tmp_path, 'UserError("--model x: no such folder")', *args, **env)
    assert done.returncode == 1
    assert done.stderr.startswith("Traceback (most recent call last):")
    assert done.stderr.rstrip().endswith("vembed_blocks.user_errors.UserError: --model x: no such folder")
    assert 'in main\n    raise UserError("--model x: no such folder")' in done.stderr
    assert DEBUG_HINT not in done.stderr


def test_vembed_debug_0_or_empty_is_not_debug(tmp_path):
    for value in ("0", ""):
        done = run_script(tmp_path, 'UserError("bad flag")', VEMBED_DEBUG=value)
        assert done.returncode == 2 and done.stderr.splitlines() == ["error: bad flag", DEBUG_HINT]


def test_other_exceptions_and_system_exit_are_untouched(tmp_path):
    done = run_script(tmp_path, 'RuntimeError("shape mismatch [3, 4] vs [4, 3]")')
    assert done.returncode == 1
    assert done.stderr.startswith("Traceback (most recent call last):")
    assert done.stderr.rstrip().endswith("RuntimeError: shape mismatch [3, 4] vs [4, 3]")
    assert DEBUG_HINT not in done.stderr
    done = run_script(tmp_path, 'SystemExit("--text-model needs --vision-model")')
    assert done.returncode == 1 and done.stderr == "--text-model needs --vision-model\n"
    with pytest.raises(KeyboardInterrupt), report_user_errors(debug=False):
        raise KeyboardInterrupt


def test_ranks_prefix_their_lines_under_torchrun(tmp_path):
    done = run_script(tmp_path, 'UserError("--model x: no such folder")', RANK="1", WORLD_SIZE="2")
    assert done.returncode == 2
    assert done.stderr.splitlines() == ["[rank 1] error: --model x: no such folder", f"[rank 1] {DEBUG_HINT}"]
    done = run_script(
        tmp_path, 'UserError("--model x: no such folder")', RANK="0", WORLD_SIZE="1"
    )  # one process: no prefix
    assert done.stderr.splitlines() == ["error: --model x: no such folder", DEBUG_HINT]


def test_data_errors_are_user_errors_also_from_a_dataloader_worker(tmp_path):
    """A missing image: the row's file:line message, whether collated in the main process or in a worker (where
    torch re-raises it as a RuntimeError holding the worker's traceback)."""
    from PIL import Image

    (tmp_path / "img").mkdir()
    for i in range(1, 5):
        Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(tmp_path / "img" / f"{i}.png")
    (tmp_path / "data.jsonl").write_text(
        "".join(json.dumps({"query": f"q{i}", "positive": f"img/{i}.png"}) + "\n" for i in range(1, 6))
    )
    script = textwrap.dedent(
        """
        import os
        import sys
        from torch.utils.data import DataLoader
        from vembed_blocks.data import read_records
        from vembed_blocks.data.images import load_image
        from vembed_blocks.user_errors import report_user_errors

        records = list(read_records("data.jsonl"))
        os.remove("img/5.png")  # deleted after the rows were read: found missing when line 5 is collated
        load = lambda i: load_image(records[i].positive.images[0], source=records[i].source)
        with report_user_errors():
            if sys.argv[1] == "worker":
                next(iter(DataLoader(range(4, 5), batch_size=None, num_workers=1, collate_fn=load)))
            load(4)
        """
    )
    for where in ("worker", "main"):
        Image.new("RGB", (8, 8)).save(tmp_path / "img" / "5.png")  # the script deletes it after reading the rows
        done = subprocess.run(
            [sys.executable, "-c", script, where], cwd=tmp_path, capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 2, done.stderr
        lines = done.stderr.splitlines()
        assert len(lines) == 2 and lines[1] == DEBUG_HINT, done.stderr
        assert lines[0].startswith("error: data.jsonl:5: cannot load image ") and "img/5.png" in lines[0]


def test_is_user_error_by_type_attribute_and_name():
    from vembed_blocks.data.images import ImageLoadError
    from vembed_blocks.data.records import RecordError

    for exc in (UserError("x"), PermissionError("x"), IsADirectoryError("x"), ImageLoadError("a.png", "gone")):
        assert is_user_error(exc)
    assert is_user_error(RecordError("d.jsonl:3", "not JSON"))
    for exc in (ValueError("x"), RuntimeError("x"), KeyError("x"), OSError("x"), TypeError("x")):
        assert not is_user_error(exc)
    wrapped = RuntimeError("Caught ValueError in DataLoader worker process 0.\nOriginal Traceback (most recent")
    assert not is_user_error(wrapped)


# ----------------------------------------------------------------------------- folder kinds


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, str]:
    """Real folders, each written by the builder or save_pretrained a user's run would use."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel, CLIPVisionModel

    from vembed_blocks.colbert import save_colbert_head
    from vembed_blocks.demo import build_tiny_clip
    from vembed_blocks.demo.text import build_tiny_bert
    from vembed_blocks.towers import compose_dual_encoder
    from vembed_blocks.vlm import load_vlm_processor

    root = tmp_path_factory.mktemp("folders")
    f = {name: str(root / name) for name in ("clip", "bert", "st", "qwen", "dino", "clip_vision", "towers", "run")}
    build_tiny_clip(f["clip"], quick=True)
    tiny_bert(f["bert"])
    build_tiny_bert(f["st"], quick=True, sentence_transformers=True)
    tiny_qwen3vl(f["qwen"])
    tiny_dinov2(f["dino"])
    CLIPVisionModel.from_pretrained(f["clip"]).save_pretrained(f["clip_vision"])
    model, processor = compose_dual_encoder(f["dino"], f["bert"], dim=8)
    model.save_pretrained(f["towers"])
    processor.save_pretrained(f["towers"])
    f["image_towers"] = str(root / "image_towers")
    model, processor = compose_dual_encoder(f["dino"], None, dim=8)
    model.save_pretrained(f["image_towers"])
    processor.save_pretrained(f["image_towers"])
    f["colbert"] = shutil.copytree(f["bert"], str(root / "colbert"))
    save_colbert_head(f["colbert"], torch.nn.Linear(32, 8, bias=False), encoder="text", dim=8)
    f["adapter"] = str(root / "adapter")
    lora = LoraConfig(r=2, target_modules=["query", "value"], base_model_name_or_path=f["bert"])
    with warnings.catch_warnings():  # peft asks transformers 5 a deprecated question; not what is tested here
        warnings.simplefilter("ignore", FutureWarning)
        get_peft_model(AutoModel.from_pretrained(f["bert"]), lora).save_pretrained(f["adapter"])
    f["processor"] = str(root / "processor")
    load_vlm_processor(f["qwen"]).save_pretrained(f["processor"])
    os.makedirs(os.path.join(f["run"], "checkpoints"))
    shutil.copytree(f["clip"], os.path.join(f["run"], "final"))
    for name in ("empty", "notes", "no_type", "diffusers"):
        f[name] = str(root / name)
        os.makedirs(f[name])
    (root / "notes" / "notes.txt").write_text("nothing")
    (root / "no_type" / "config.json").write_text(json.dumps({"hidden_size": 8}))
    (root / "diffusers" / "model_index.json").write_text(json.dumps({"_class_name": "QwenImageEditPipeline"}))
    return f


def test_folder_kind_of_real_folders(folders):
    want = {
        "clip": "clip",
        "bert": "text",
        "st": "text",
        "qwen": "vlm",
        "dino": "vision",
        "clip_vision": "vision",
        "towers": "towers",
        "image_towers": "towers",
        "colbert": "colbert",
        "adapter": "adapter",
        "processor": "processor",
        "run": "run",
        "empty": "unknown",
        "notes": "unknown",
        "no_type": "unknown",
        "diffusers": "diffusers",
    }
    assert {name: folder_kind(folders[name]) for name in want} == want
    with pytest.raises(FileNotFoundError):
        folder_kind(os.path.join(folders["empty"], "missing"))
    with pytest.raises(NotADirectoryError):
        folder_kind(os.path.join(folders["notes"], "notes.txt"))


def test_config_kind_of_known_model_types():
    assert config_kind({"model_type": "siglip", "text_config": {}, "vision_config": {}}) == "clip"
    assert config_kind({"model_type": "qwen2_vl", "vision_config": {}}) == "vlm"
    assert config_kind({"model_type": "llava", "image_token_index": 32000, "text_config": {}}) == "vlm"
    assert config_kind({"model_type": "vit", "num_channels": 3}) == "vision"
    assert config_kind({"model_type": "beit", "vocab_size": 8192, "num_channels": 3}) == "vision"
    assert config_kind({"model_type": "xlm-roberta", "vocab_size": 250002}) == "text"
    assert config_kind({"model_type": "qwen3", "vocab_size": 151669}) == "text"
    assert config_kind({"hidden_size": 8}) == "unknown"


def test_what_looks_like_a_hugging_face_id():
    for value in ("bert-base-uncased", "BAAI/bge-small-en-v1.5", "Qwen/Qwen3-VL-2B-Instruct", "org/name_2.0"):
        assert looks_like_hf_id(value), value
    for value in ("runs/x/final", "./model", "/abs/model", "~/model", "a\\b", "org/../x", "org/", "/", ""):
        assert not looks_like_hf_id(value), value


# ----------------------------------------------------------------------------- check_model_arg messages


def test_a_missing_path_a_file_and_an_id(folders, tmp_path):
    with pytest.raises(UserError) as e:
        check_model_arg("--model", "runs/x/final", {"clip", "towers"})
    assert str(e.value) == (
        "--model runs/x/final: no such folder (and not a Hugging Face id). Check the path; "
        "a recipe's export is <output>/final."
    )
    config = os.path.join(folders["clip"], "config.json")
    with pytest.raises(UserError) as e:
        check_model_arg("--model", config, "clip")
    assert str(e.value) == f"--model {config} is a file; pass the model folder that holds it, --model {folders['clip']}"
    assert check_model_arg("--model", "openai/clip-vit-base-patch32", {"clip"}) is None  # left to from_pretrained
    assert check_model_arg("--model", folders["clip"], {"clip", "towers"}) == "clip"


def test_wrong_kinds_each_way(folders):
    cases = [
        (
            "--model",
            "dino",
            {"clip", "towers"},
            "is a vision backbone (dinov2), not a CLIP/SigLIP folder; "
            "pass it as --vision-model (with --format i2i, or --text-model for towers)",
        ),
        (
            "--model",
            "bert",
            {"clip", "towers"},
            "is a text encoder (bert), not a CLIP/SigLIP folder; pass it as --text-model (with --vision-model: towers)",
        ),
        (
            "--text-model",
            "clip",
            {"text"},
            "is a CLIP folder (vision and text), not a text encoder (HF or sentence-transformers); pass it as --model",
        ),
        (
            "--vision-model",
            "st",
            {"vision", "clip"},
            "is a text encoder (bert), not a vision backbone or a CLIP/SigLIP folder; "
            "pass it as --text-model (with --vision-model: towers)",
        ),
        (
            "--model",
            "qwen",
            {"text"},
            "is a vision-language model (qwen3_vl), not a text encoder (HF or sentence-transformers)",
        ),
        ("--model", "clip", {"vlm"}, "is a CLIP folder (vision and text), not a Qwen-VL model (qwen3_vl / qwen2_vl)"),
        ("--model", "diffusers", {"text"}, "is a diffusers pipeline, not a text encoder (HF or sentence-transformers)"),
    ]
    for flag, name, expect, tail in cases:
        with pytest.raises(UserError) as e:
            check_model_arg(flag, folders[name], expect)
        assert str(e.value) == f"{flag} {folders[name]} {tail}"
    towers = folders["towers"]
    with pytest.raises(UserError) as e:
        check_model_arg("--vision-model", towers, {"vision", "clip"})
    assert str(e.value) == (
        f"--vision-model {towers} is composed towers (vision/ + text/), not a vision backbone or a CLIP/SigLIP "
        f"folder; pass its vision backbone, --vision-model {towers}/vision"
    )
    assert check_model_arg("--vision-model", os.path.join(towers, "vision"), {"vision", "clip"}) == "vision"
    assert check_model_arg("--text-model", os.path.join(towers, "text"), {"text"}) == "text"


def test_a_run_folder_an_adapter_and_non_model_folders(folders):
    run = folders["run"]
    with pytest.raises(UserError) as e:
        check_model_arg("--model", run, {"clip", "towers"})
    assert (
        str(e.value)
        == f"--model {run} is a run folder (no config.json); its export is {run}/final: pass --model {run}/final"
    )
    with pytest.raises(UserError) as e:
        check_model_arg("--model", folders["adapter"], {"text"})
    assert str(e.value) == (
        f"--model {folders['adapter']} is a LoRA adapter (adapter_config.json) without its base model's weights; "
        f"pass the merged export (export_pretrained merges LoRA) or its base model, {folders['bert']}"
    )
    notes = folders["notes"]
    with pytest.raises(UserError) as e:
        check_model_arg("--model", notes, {"text"})
    assert str(e.value).splitlines() == [
        f"--model {notes} has no config.json: not a model folder (a run folder? its export would be {notes}/final)",
        f"cannot tell what {notes} holds: looked for config.json, composed_dual_encoder.json, colbert.json, "
        "modules.json, model_index.json, adapter_config.json; found notes.txt",
    ]
    with pytest.raises(UserError) as e:
        check_model_arg("--model", folders["no_type"], {"text"})
    assert (
        str(e.value)
        == f"--model {folders['no_type']}: its config.json names no model_type: not a Hugging Face model folder"
    )


# ----------------------------------------------------------------------------- the loaders


def test_loaders_raise_the_one_line_errors_before_loading(folders):
    from vembed_blocks.encoder import load_encoder
    from vembed_blocks.text_encoder import load_text_encoder
    from vembed_blocks.towers import compose_dual_encoder, load_dual_encoder
    from vembed_blocks.vlm import load_vlm_processor

    f = folders
    cases = [
        (lambda: load_dual_encoder(f["dino"]), f"--model {f['dino']} is a vision backbone (dinov2), not a CLIP/SigLIP"),
        (lambda: load_dual_encoder("runs/x/final"), "--model runs/x/final: no such folder (and not a Hugging Face id)"),
        (lambda: load_dual_encoder(f["run"]), f"--model {f['run']} is a run folder (no config.json); its export is"),
        (lambda: compose_dual_encoder(f["bert"], None, 8), f"--vision-model {f['bert']} is a text encoder (bert)"),
        (lambda: compose_dual_encoder(f["dino"], f["clip"], 8), f"--text-model {f['clip']} is a CLIP folder"),
        (lambda: load_text_encoder(f["clip"], flag="--teacher"), f"--teacher {f['clip']} is a CLIP folder"),
        (lambda: load_text_encoder(f["dino"]), f"--model {f['dino']} is a vision backbone (dinov2), not a text"),
        (lambda: load_vlm_processor(f["bert"]), f"--model {f['bert']} is a text encoder (bert), not a Qwen-VL model"),
        (
            lambda: load_encoder(f["dino"]),
            f"--model {f['dino']} is a vision backbone (dinov2), not an exported encoder",
        ),
        (lambda: load_encoder(f["run"]), f"--model {f['run']} is a run folder (no config.json); its export is"),
        (lambda: load_encoder(f["adapter"]), f"--model {f['adapter']} is a LoRA adapter"),
        (lambda: load_encoder(f["processor"]), f"--model {f['processor']} is a processor / tokenizer without a model"),
    ]
    for load, start in cases:
        with pytest.raises(UserError) as e:
            load()
        assert str(e.value).startswith(start), str(e.value)
        assert len(str(e.value).splitlines()) <= 2


def test_a_hub_id_that_cannot_be_fetched_is_one_line(folders):
    """Tests run offline (conftest): an id that is not in the cache fails to load, named as such."""
    from vembed_blocks.text_encoder import load_text_encoder
    from vembed_blocks.towers import load_dual_encoder
    from vembed_blocks.vlm import load_vlm_processor

    for load in (load_dual_encoder, load_text_encoder, load_vlm_processor):
        with pytest.raises(UserError) as e:
            load("vembed-tests/no-such-model")
        message = str(e.value)
        assert message.startswith(
            "--model vembed-tests/no-such-model: not a local folder and loading it from the Hugging Face hub failed: "
        )
        assert "\n" not in message
