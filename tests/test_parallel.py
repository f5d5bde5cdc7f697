"""shard_model / wrap_ddp / checkpoint_layers / apply_lora on real gloo ranks.

One 2-rank launch trains one SGD step of a tiny CLIP and a tiny Qwen3-VL under FSDP2 and
under DDP (each rank holding half of the batch) and compares every parameter with one
plain single-process step on the concatenated batch, computed inside the same rank.
SGD (not Adam) so that a gradient off by a factor of W would show in the parameters.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from _multiproc import run_ranks
from torch import nn

from vembed_blocks.distributed import gather_with_offset
from vembed_blocks.grad_sync import clip_gradients
from vembed_blocks.parallel import apply_lora, checkpoint_layers, shard_model, wrap_ddp

LR = 0.5
ATOL = 1e-5


# ---------------------------------------------------------------- tiny real models
def tiny_clip_config(dropout: float = 0.0):
    from transformers import CLIPConfig

    common = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, attention_dropout=dropout
    )
    return CLIPConfig(
        text_config=dict(
            common, vocab_size=100, max_position_embeddings=16, bos_token_id=0, eos_token_id=2, pad_token_id=1
        ),
        vision_config=dict(common, image_size=16, patch_size=8),
        projection_dim=16,
    )


def tiny_qwen3vl_config():
    from transformers import Qwen3VLConfig

    return Qwen3VLConfig(
        text_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            vocab_size=128,
            rope_scaling={"rope_type": "default", "mrope_section": [1, 1, 2]},
        ),
        vision_config=dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=4,
            out_hidden_size=32,
            patch_size=4,
            temporal_patch_size=2,
            spatial_merge_size=2,
            num_position_embeddings=16,
            deepstack_visual_indexes=[1],
        ),
        image_token_id=100,
        video_token_id=101,
        vision_start_token_id=102,
        vision_end_token_id=103,
    )


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """Save tiny random CLIP and Qwen3-VL with save_pretrained; ranks load them back."""
    from transformers import CLIPModel, Qwen3VLModel

    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    CLIPModel(tiny_clip_config()).save_pretrained(root / "clip")
    Qwen3VLModel(tiny_qwen3vl_config()).save_pretrained(root / "qwen")
    return str(root / "clip"), str(root / "qwen")


# ---------------------------------------------------------------- batches and losses
def clip_batch(n: int = 4) -> dict:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 100, (n, 8), generator=g)
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=torch.randn(n, 3, 16, 16, generator=g))


def qwen_batch(n: int = 4) -> dict:
    """Queries: text only. Docs: 4 image tokens (one 16-patch image, merged 2x2) + text."""
    g = torch.Generator().manual_seed(2)
    q = torch.randint(0, 90, (n, 7), generator=g)
    d = torch.randint(0, 90, (n, 10), generator=g)
    d[:, 1], d[:, 2:6], d[:, 6] = 102, 100, 103
    return dict(q=q, d=d, pixel_values=torch.randn(n * 16, 96, generator=g))


def _features(out) -> torch.Tensor:
    return out if torch.is_tensor(out) else out.pooler_output


def clip_loss(model, b: dict, gather: bool) -> torch.Tensor:
    """Symmetric CLIP loss, local rows against gathered columns; scale = exp(logit_scale)."""
    t = F.normalize(
        _features(model.get_text_features(input_ids=b["input_ids"], attention_mask=b["attention_mask"])), dim=-1
    )
    i = F.normalize(_features(model.get_image_features(pixel_values=b["pixel_values"])), dim=-1)
    scale = unwrapped(model).logit_scale.exp()
    (t_all, off), (i_all, _) = (gather_with_offset(t), gather_with_offset(i)) if gather else ((t, 0), (i, 0))
    labels = torch.arange(t.shape[0]) + off
    return (F.cross_entropy(scale * t @ i_all.T, labels) + F.cross_entropy(scale * i @ t_all.T, labels)) / 2


def qwen_loss(model, b: dict, gather: bool) -> torch.Tensor:
    """InfoNCE (temperature 0.05) of last-token embeddings: text queries vs image+text docs."""
    n = b["q"].shape[0]
    q = model(input_ids=b["q"], attention_mask=torch.ones_like(b["q"])).last_hidden_state[:, -1]
    d = model(
        input_ids=b["d"],
        attention_mask=torch.ones_like(b["d"]),
        pixel_values=b["pixel_values"],
        image_grid_thw=torch.tensor([[1, 4, 4]] * n),
        mm_token_type_ids=(b["d"] == 100).long(),
    ).last_hidden_state[:, -1]
    q, d = F.normalize(q, dim=-1), F.normalize(d, dim=-1)
    d_all, off = gather_with_offset(d) if gather else (d, 0)
    return F.cross_entropy(q @ d_all.T / 0.05, torch.arange(n) + off)


def unwrapped(model):
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def full_params(model) -> dict[str, torch.Tensor]:
    """Full (gathered) parameters; every rank must call it (DTensor.full_tensor is a collective)."""
    out = {}
    for n, p in unwrapped(model).named_parameters():
        p = p.full_tensor() if hasattr(p, "full_tensor") else p
        out[n] = p.detach().clone()
    return out


def local_slice(b: dict, rank: int, world: int) -> dict:
    n = b["q"].shape[0] if "q" in b else b["input_ids"].shape[0]
    k = n // world
    out = {}
    for key, v in b.items():
        per = v.shape[0] // n  # pixel rows per sample (flattened Qwen patches)
        out[key] = v[rank * k * per : (rank + 1) * k * per]
    return out


def sgd_step(model, loss_fn, batch, gather) -> tuple[float, float]:
    """One SGD step; returns the loss and the gradient norm (`clip_gradients` with 0: measured, not clipped)."""
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    loss = loss_fn(model, batch, gather)
    loss.backward()
    norm = clip_gradients(model.parameters(), 0)
    opt.step()
    return loss.item(), norm


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys(), set(a) ^ set(b)
    return max((a[k].reshape(-1) - b[k].reshape(-1)).abs().max().item() for k in a)


# ---------------------------------------------------------------- the launch
def _equivalence(rank, world, clip_dir, qwen_dir):
    from transformers import CLIPModel, Qwen3VLModel
    from transformers.utils import logging

    logging.disable_progress_bar()
    torch.manual_seed(0)
    results = {"moved": {}}
    cases = {
        "clip": (CLIPModel, clip_dir, clip_loss, clip_batch()),
        "qwen3vl": (Qwen3VLModel, qwen_dir, qwen_loss, qwen_batch()),
    }
    for name, (cls, path, loss_fn, batch) in cases.items():
        ref = cls.from_pretrained(path)
        global_loss, global_norm = sgd_step(ref, loss_fn, batch, gather=False)
        ref_params = full_params(ref)
        results["moved"][name] = max_diff(ref_params, full_params(cls.from_pretrained(path)))
        for how in ("fsdp", "fsdp+ckpt", "ddp", "fsdp-bf16"):
            model = cls.from_pretrained(path)
            if how == "fsdp+ckpt":
                checkpoint_layers(model)
            if how == "ddp":
                model = wrap_ddp(model)
            else:
                model = shard_model(model, mixed_precision="bf16" if how == "fsdp-bf16" else None)
            local_loss, norm = sgd_step(model, loss_fn, local_slice(batch, rank, world), gather=True)
            losses = [None] * world
            torch.distributed.all_gather_object(losses, local_loss)
            results[f"{name}/{how}"] = (
                max_diff(full_params(model), ref_params),
                abs(sum(losses) / world - global_loss),
                abs(norm - global_norm) / global_norm,
            )
    return results


def test_one_step_matches_single_process(model_dirs):
    res = run_ranks(_equivalence, 2, *model_dirs, timeout=300)
    moved = [r.pop("moved") for r in res][0]
    for rank, checks in enumerate(res):
        for key, (pdiff, ldiff, norm_rel) in checks.items():
            if rank == 0:
                print(
                    f"{key}: max |param diff| {pdiff:.2e}, |loss diff| {ldiff:.2e}, grad norm rel. diff {norm_rel:.2e}"
                )
            if key.endswith("bf16"):  # bf16 compute (8 mantissa bits): the update is only close
                assert pdiff < 0.2 * moved[key.split("/")[0]] and ldiff < 5e-2 and norm_rel < 5e-2, key
            else:  # fp32 paths: equal to float rounding; the norm over sharded (DTensor) grads too
                assert pdiff < ATOL and ldiff < ATOL and norm_rel < 1e-5, key
    print("largest parameter change of the reference step:", moved)
    # The check has teeth only if the step moves parameters far more than the tolerance.
    assert all(m > 1e-2 for m in moved.values()), moved


# ---------------------------------------------------------------- single-process pieces
def test_no_process_group_is_noop_and_lora_targets(model_dirs):
    from transformers import BertConfig, BertModel, CLIPModel

    clip = CLIPModel.from_pretrained(model_dirs[0])
    assert shard_model(clip) is clip and wrap_ddp(clip) is clip
    assert clip.logit_scale.dim() == 0  # untouched without a process group
    lora = apply_lora(clip, r=4, alpha=8)
    targets = set(lora.peft_config["default"].target_modules)
    assert targets == {"q_proj", "k_proj", "v_proj", "out_proj"}
    trainable = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)

    bert = BertModel(
        BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64, vocab_size=50)
    )
    assert set(apply_lora(bert, r=2, alpha=4).peft_config["default"].target_modules) == {
        "query",
        "key",
        "value",
        "attention.output.dense",
    }


def test_checkpoint_layers_same_gradients(model_dirs):
    """Recomputation with dropout on gives the gradients of the plain model (RNG replayed)."""
    from transformers import CLIPModel

    torch.manual_seed(0)
    base = CLIPModel(tiny_clip_config(dropout=0.3)).train()
    ckpt = checkpoint_layers(copy.deepcopy(base))
    grads = []
    for m in (base, ckpt):
        torch.manual_seed(5)
        clip_loss(m, clip_batch(), gather=False).backward()
        grads.append({n: p.grad for n, p in m.named_parameters()})
    assert max_diff(*grads) < 1e-6
    assert list(dict(base.named_parameters())) == list(dict(ckpt.named_parameters()))


class _Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)

    def forward(self, x):
        return torch.nn.functional.gelu(self.lin(x)) + x


def test_compile_layers_in_place_keeps_names_values_and_gradients():
    from vembed_blocks.parallel import compile_layers

    torch.manual_seed(0)
    model = torch.nn.Sequential(_Block(), _Block())
    keys = list(model.state_dict())
    x = torch.randn(4, 8)
    want = model(x)
    want_grad = torch.autograd.grad(want.sum(), model[0].lin.weight)[0]
    compile_layers(model, [_Block])
    got = model(x)
    assert list(model.state_dict()) == keys  # no _orig_mod prefix: checkpoints and LoRA see the same tree
    assert torch.allclose(got, want, atol=1e-6)
    assert torch.allclose(torch.autograd.grad(got.sum(), model[0].lin.weight)[0], want_grad, atol=1e-6)
    assert all(getattr(b, "_compiled_call_impl", None) is not None for b in model)


def test_compile_layers_falls_back_to_eager_only_when_asked():
    import torch._dynamo

    from vembed_blocks.parallel import compile_layers

    with torch._dynamo.config.patch(suppress_errors=False):  # restored on exit: no setting leaks to other tests
        compile_layers(torch.nn.Sequential(_Block()), [_Block])
        assert torch._dynamo.config.suppress_errors is False  # nothing process-wide by default
        compile_layers(torch.nn.Sequential(_Block()), [_Block], fallback_to_eager=True)
        assert torch._dynamo.config.suppress_errors is True


def test_checkpoint_layers_wraps_once_and_adds_nothing_but_forward():
    torch.manual_seed(0)
    model = torch.nn.Sequential(_Block(), _Block())
    before = [set(vars(b)) for b in model]
    x = torch.randn(4, 8)
    want = torch.autograd.grad(model(x).sum(), model[0].lin.weight)[0]
    checkpoint_layers(model, [_Block])
    checkpoint_layers(model, [_Block])  # a second call leaves checkpointed blocks alone
    for b, keys in zip(model, before):
        assert set(vars(b)) - keys == {"forward"}  # the checkpointed forward itself, no marker attribute
        inner = b.forward.args[0]
        assert inner.__func__ is _Block.forward  # wrapped exactly once
    assert torch.allclose(torch.autograd.grad(model(x).sum(), model[0].lin.weight)[0], want, atol=1e-6)


def _scalar_registry(rank, world, clip_dir):
    import gc

    from transformers import CLIPModel

    from vembed_blocks.parallel import _RESHAPED_SCALARS, reshaped_scalar_params

    model = CLIPModel.from_pretrained(clip_dir)
    before = set(vars(model))
    shard_model(model)
    out = {
        "names": reshaped_scalar_params(model),
        "shape": tuple(model.logit_scale.shape),
        "new_attrs": sorted(k for k in set(vars(model)) - before if "vembed" in k),
    }
    del model
    gc.collect()
    out["left"] = len(_RESHAPED_SCALARS)  # weakly keyed: gone with the model
    return out


def test_shard_model_remembers_reshaped_scalars_without_marking_the_model(model_dirs):
    (res,) = run_ranks(_scalar_registry, 1, model_dirs[0], timeout=120)
    assert res == {"names": ("logit_scale",), "shape": (1,), "new_attrs": [], "left": 0}
