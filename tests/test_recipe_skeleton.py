"""The training recipes share one skeleton: the regions marked ``# <shared: name>`` ... ``# </shared>``
are the same text in every training recipe, so a diff between two recipes shows
only their model, collator, loss and evaluation. Drift (a fix made in one copy) fails here."""

from __future__ import annotations

import re

import pytest
import torch
from _recipes import ROOT, load_script

SKELETON = [
    "clip_t2i",
    "text_t2t",
    "distill",
    "qwen3_fsdp",
    "colbert",
    "multitask",
    "edit_sft",
]  # every training recipe
REGION = re.compile(r"^ *# <shared: (?P<name>[^>]+)>\n(?P<body>.*?)^ *# </shared>", re.S | re.M)


def regions(name: str) -> dict[str, str]:
    found = {m["name"]: m["body"] for m in REGION.finditer((ROOT / "recipes" / f"{name}.py").read_text())}
    assert found, f"{name}.py has no shared regions"
    return found


@pytest.mark.parametrize("name", SKELETON[1:])
def test_shared_regions_are_identical(name):
    base, other = regions(SKELETON[0]), regions(name)
    assert list(other) == list(base), f"{name}.py: regions {list(other)}, {SKELETON[0]}.py: {list(base)}"
    for region, body in base.items():
        if other[region] != body:
            a, b = body.splitlines(), other[region].splitlines()
            first = next(i for i, (x, y) in enumerate(zip(a + [""], b + [""])) if x != y)
            pytest.fail(
                f"region {region!r} of {name}.py differs from {SKELETON[0]}.py at its line {first + 1}:\n"
                f"  {SKELETON[0]}: {a[first] if first < len(a) else '<end>'}\n"
                f"  {name}: {b[first] if first < len(b) else '<end>'}"
            )


def test_the_skeleton_covers_the_run():
    assert list(regions(SKELETON[0])) == ["helpers", "set-up", "resume, evaluate before", "the loop", "finish"]


@pytest.mark.parametrize("name", SKELETON)
def test_the_loop_shows_its_steps(name):
    """The steps a reader needs are lines of the recipe, not hidden a call away in the library: the GradCache
    encode, the one gradient average after the micro-batches, the validation loss; FSDP2 recipes shard in the file."""
    text = (ROOT / "recipes" / f"{name}.py").read_text()
    loop = regions(name)["the loop"]
    if name != "edit_sft":  # each edit row is its own forward and loss term: no cross-row loss for GradCache to cut
        assert "gc.encode(" in text, f"{name}.py: no GradCache encode call"
    assert "average_gradients(" in loop and "defer_gradient_sync(" in loop, f"{name}.py: gradient sync not in the loop"
    assert "validation_loss(" in loop and "def validation_loss(" in regions(name)["helpers"]
    if "fsdp" in name or name == "edit_sft":
        assert "shard_model(" in text or "fully_shard(" in text, f"{name}.py: the sharding is not in the recipe"


@pytest.mark.parametrize("name", ["clip_t2i"])
def test_validation_loss_is_one_pass_in_eval_mode_and_leaves_the_rng_alone(name, monkeypatch):
    """The skeleton's validation_loss (the same text in every training recipe; clip_t2i's copy here, with the
    recipe's load_data and step_loss swapped for plain ones): one pass over the validation rows (rows // batch
    steps), step_loss averaged, the model in eval mode while it runs and back in train mode after, the RNG as
    before (resumed runs draw the same training noise); {} when load_data says the loss is undefined."""
    import argparse
    from types import SimpleNamespace

    from vembed_blocks.data import TaskLoader, WeightedTaskSampler

    recipe = load_script(name)

    rows = [float(i) for i in range(12)]
    args = argparse.Namespace(batch_size=4, grad_accum_steps=1)
    model = torch.nn.Dropout(0.5)
    parts = SimpleNamespace(model=model)
    seen = []

    def load_data(args, parts, path, rank, world):
        sampler = WeightedTaskSampler({"val": len(rows)}, args.batch_size, seed=1, rank=rank, world_size=world)
        return TaskLoader({"val": rows}, sampler, lambda r: torch.tensor(r)), len(rows)

    def step_loss(args, parts, batch, gc, device):
        assert gc is None and not parts.model.training and not torch.is_grad_enabled()
        torch.rand(3)  # a loss that draws noise (edit_sft): must not move the training RNG
        seen.append(batch)
        return batch.mean()

    monkeypatch.setattr(recipe, "load_data", load_data)
    monkeypatch.setattr(recipe, "step_loss", step_loss)
    torch.manual_seed(5)
    want_rng = torch.get_rng_state()
    got = recipe.validation_loss(args, parts, "val.jsonl", 0, 1, torch.device("cpu"))
    assert torch.equal(torch.get_rng_state(), want_rng) and model.training
    assert len(seen) == 3 and sorted(torch.cat(seen).tolist()) == rows  # every row once
    assert got == {"loss": pytest.approx(sum(rows) / len(rows), abs=1e-12)}
    monkeypatch.setattr(recipe, "load_data", lambda *a: None)
    assert recipe.validation_loss(args, parts, "val.jsonl", 0, 1, torch.device("cpu")) == {}
