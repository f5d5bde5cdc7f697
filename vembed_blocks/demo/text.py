"""A procedural text-retrieval set and a tiny random BERT, for the text recipes' demos and tests.

``write_text_pairs`` writes query/passage pairs about a coloured animal in a place
(``{"query": "where is the red fox ? the garden", "positive": "in the garden there is a red fox",
"negatives": [...], "label": "red fox garden"}``): every row's hard negatives differ from it in
one attribute, its label names its combination (rows of one combination are duplicates, not
negatives), and validation holds combinations never seen in training. ``build_tiny_bert`` saves
a randomly initialised ``BertModel`` with a word-level tokenizer over that vocabulary (optionally
also as a sentence-transformers folder); ``write_ideal_teacher`` writes the embeddings an ideal
teacher would give (which colour, animal and place a text names) as a row-aligned
``teacher.safetensors`` for ``recipes/distill.py``. ``prepare_text_demo`` is what a recipe
calls when it has no ``--data``: rank 0 writes all of it under ``<output>/demo``, every rank waits;
``parse_with_demo`` gives a recipe's parser the demo's defaults (``DEMO_DEFAULTS``) when ``--data`` is absent.
"""

from __future__ import annotations

import argparse
import json
import os
import random

import torch

from .shapes import word_level_tokenizer

__all__ = [
    "COLOURS",
    "ANIMALS",
    "PLACES",
    "DEMO_DEFAULTS",
    "demo_vocabulary",
    "write_text_pairs",
    "build_tiny_bert",
    "ideal_embedding",
    "write_ideal_teacher",
    "prepare_text_demo",
    "parse_with_demo",
]

COLOURS = ["red", "green", "blue", "yellow", "purple", "white"]
ANIMALS = ["cat", "dog", "fox", "owl", "horse", "rabbit"]
PLACES = ["garden", "kitchen", "roof", "river", "street"]
QUERY_TEMPLATES = ["{c} {a} {p}", "where is the {c} {a} ? the {p}", "find a {c} {a} near the {p}", "{a} , {c} , {p}"]
DOC_TEMPLATES = [
    "a {c} {a} sleeps in the {p}",
    "in the {p} there is a {c} {a}",
    "the {a} by the {p} is {c}",
    "we saw one {c} {a} at the {p} today",
]
# Per recipe, the demo's training defaults as a function of --demo-quick (explicit flags win):
# a random model learns from scratch, so a much larger step than a fine-tune.
DEMO_DEFAULTS = {
    "text_t2t": lambda quick: dict(lr=1e-3, max_steps=20 if quick else 60, batch_size=32),
    "distill": lambda quick: dict(lr=1e-3, max_steps=20 if quick else 60, batch_size=32),
    "colbert": lambda quick: dict(lr=1e-3, max_steps=20 if quick else 60, batch_size=32, dim=32, num_negatives=1),
}


def demo_vocabulary() -> list[str]:
    """Every word the demo's templates and attributes produce (the tokenizer's vocabulary, sorted)."""
    words = {w for t in QUERY_TEMPLATES + DOC_TEMPLATES for w in t.split() if "{" not in w}
    return sorted(words | set(COLOURS) | set(ANIMALS) | set(PLACES))


def _row(combo: tuple[str, str, str], rng: random.Random, n_negatives: int) -> dict:
    """One pair of ``combo`` (colour, animal, place) with hard negatives that change one attribute each."""
    c, a, p = combo
    negatives = []
    for slot in rng.sample(range(3), n_negatives):
        pool = (COLOURS, ANIMALS, PLACES)[slot]
        other = list(combo)
        other[slot] = rng.choice([x for x in pool if x != combo[slot]])
        negatives.append(rng.choice(DOC_TEMPLATES).format(c=other[0], a=other[1], p=other[2]))
    return {
        "query": rng.choice(QUERY_TEMPLATES).format(c=c, a=a, p=p),
        "positive": rng.choice(DOC_TEMPLATES).format(c=c, a=a, p=p),
        "negatives": negatives,
        "label": f"{c} {a} {p}",
    }


def write_text_pairs(out_dir: str, per_combo: int, seed: int, val_fraction: float = 0.2) -> tuple[str, str]:
    """(train.jsonl, val.jsonl) under ``out_dir``: 180 colour x animal x place combinations, ``val_fraction``
    of them held out for validation (one row each, unique queries), ``per_combo`` training rows for the rest.

    Training rows carry 0-2 hard negatives (ragged) and a string label; validation rows one hard negative
    each, so the corpus holds near-misses of every query.
    """
    if per_combo < 1 or not 0 < val_fraction < 1:
        raise ValueError(f"write_text_pairs: per_combo >= 1 and 0 < val_fraction < 1, got {per_combo}, {val_fraction}")
    rng = random.Random(seed)
    combos = [(c, a, p) for c in COLOURS for a in ANIMALS for p in PLACES]
    rng.shuffle(combos)
    n_val = max(1, round(val_fraction * len(combos)))
    splits = {
        "train": [_row(combo, rng, rng.randint(0, 2)) for combo in combos[n_val:] for _ in range(per_combo)],
        "val": [_row(combo, rng, 1) for combo in combos[:n_val]],
    }
    os.makedirs(out_dir, exist_ok=True)
    files = {}
    for split, rows in splits.items():
        rng.shuffle(rows)
        files[split] = os.path.join(out_dir, f"{split}.jsonl")
        with open(files[split], "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    return files["train"], files["val"]


def build_tiny_bert(
    out_dir: str,
    quick: bool,
    words: list[str] | None = None,
    sentence_transformers: bool = False,
    dropout: float = 0.1,
) -> str:
    """A random ``BertModel`` (width 64, 2 layers; 32 and 1 when ``quick``) + a word-level tokenizer with
    [CLS]/[SEP] over ``words`` (default: `demo_vocabulary`), saved as an HF folder; with
    ``sentence_transformers`` also the sentence-transformers files (mean pooling, L2-normalised)."""
    from transformers import BertConfig, BertModel

    specials = ("[PAD]", "[UNK]", "[CLS]", "[SEP]")
    words = words or demo_vocabulary()
    tokenizer = word_level_tokenizer(
        words, specials, "[CLS] $A [SEP]", punctuation=False, cls_token="[CLS]", sep_token="[SEP]", model_max_length=32
    )
    width, layers = (32, 1) if quick else (64, 2)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=width,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=2 * width,
        max_position_embeddings=32,
        pad_token_id=0,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    # Only rank 0 builds the model: a fork keeps its global RNG equal to the other ranks' (seeded layers
    # created later, e.g. ColBERT's projection, must start equal everywhere).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        BertModel(config).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    if sentence_transformers:
        from ..text_encoder import write_st_files

        write_st_files(out_dir, width, "mean", normalize=True, max_length=32)
    return out_dir


def ideal_embedding(text: str) -> torch.Tensor:
    """``[17]``: which colour, animal and place ``text`` names (one-hot each): what a perfect teacher knows."""
    words = set(text.split())
    return torch.tensor([float(w in words) for w in COLOURS + ANIMALS + PLACES])


def write_ideal_teacher(train_file: str, out_dir: str) -> str:
    """``out_dir/teacher.safetensors`` with ``query`` and ``doc`` ``[R, 17]`` (`ideal_embedding` of row i's
    query and positive): the row-aligned layout ``--teacher-embeddings`` reads."""
    from safetensors.torch import save_file

    with open(train_file) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    os.makedirs(out_dir, exist_ok=True)
    tensors = {
        "query": torch.stack([ideal_embedding(r["query"]) for r in rows]),
        "doc": torch.stack([ideal_embedding(r["positive"]) for r in rows]),
    }
    save_file(tensors, os.path.join(out_dir, "teacher.safetensors"))
    return out_dir


def prepare_text_demo(args: argparse.Namespace, rank: int, world: int, recipe: str) -> tuple[str, str]:
    """(train file, val file) of the demo under ``<args.output>/demo``, written by rank 0 (every rank waits).

    Without ``args.model`` a tiny BERT is saved to ``demo/model`` (a sentence-transformers folder for
    ``text_t2t``) and ``args.model`` points at it; for ``distill`` without a teacher the ideal teacher's
    embeddings go to ``demo/teacher`` and ``args.teacher_embeddings`` points at them.
    """
    if recipe not in DEMO_DEFAULTS:
        raise ValueError(f"prepare_text_demo: no demo for {recipe!r}; one of {sorted(DEMO_DEFAULTS)}")
    demo = os.path.join(args.output, "demo")
    quick = getattr(args, "demo_quick", False)
    train, val = os.path.join(demo, "train.jsonl"), os.path.join(demo, "val.jsonl")
    wants_teacher = recipe == "distill" and not (args.teacher or args.teacher_embeddings)
    if rank == 0:
        write_text_pairs(demo, per_combo=2 if quick else 6, seed=args.seed)
        if args.model is None:
            build_tiny_bert(os.path.join(demo, "model"), quick, sentence_transformers=recipe == "text_t2t")
        if wants_teacher:
            write_ideal_teacher(train, os.path.join(demo, "teacher"))
    if world > 1:
        torch.distributed.barrier()
    args.model = args.model or os.path.join(demo, "model")
    if wants_teacher:
        args.teacher_embeddings = os.path.join(demo, "teacher")
    return train, args.val_data or val


def parse_with_demo(p: argparse.ArgumentParser, argv: list[str] | None, recipe: str) -> argparse.Namespace:
    """``p.parse_args(argv)`` with ``--demo-quick`` added; without ``--data`` the demo's `DEMO_DEFAULTS`
    (explicit flags still win), with ``--data`` but no ``--model`` a parser error naming ``--model``."""
    p.add_argument("--demo-quick", action="store_true", help="demo: a smaller set and model (tests)")
    args, _ = p.parse_known_args(argv)
    if args.data is None:  # the demo trains a random model from scratch: a larger step than a fine-tune
        p.set_defaults(**DEMO_DEFAULTS[recipe](args.demo_quick))
    elif args.model is None:
        p.error("--model is required with --data (an HF id or a local folder)")
    return p.parse_args(argv)
