"""A procedural text-retrieval set and a tiny random BERT, for the text recipes' demos and tests.

``write_text_pairs`` writes query/passage pairs about a coloured animal in a place
(``{"query": "where is the red fox ? the garden", "positive": "in the garden there is a red fox",
"negatives": [...], "label": "red fox garden"}``): every row's hard negatives differ from it in
one attribute, its label names its combination (rows of one combination are duplicates, not
negatives), and validation holds combinations never seen in training. ``build_tiny_bert`` saves
a randomly initialised ``BertModel`` with a word-level tokenizer over that vocabulary (optionally
also as a sentence-transformers folder); ``write_ideal_teacher`` writes the embeddings an ideal
teacher would give (which colour, animal and place a text names) as a row-aligned
``teacher.safetensors`` (the layout ``teacher_store.TeacherStore`` reads). ``prepare_text_demo``
writes whichever of these a caller asks for under one folder, on rank 0, while every rank waits,
and returns their paths; what to ask for, and the training defaults that suit a model trained from
scratch, are the caller's choice.
"""

from __future__ import annotations

import json
import os
import random

import torch

from .shapes import word_level_tokenizer

__all__ = [
    "COLOURS",
    "ANIMALS",
    "PLACES",
    "demo_vocabulary",
    "write_text_pairs",
    "build_tiny_bert",
    "ideal_embedding",
    "write_ideal_teacher",
    "prepare_text_demo",
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
    query and positive): the row-aligned layout `teacher_store.TeacherStore` reads."""
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


def prepare_text_demo(
    out_dir: str,
    *,
    quick: bool,
    seed: int,
    rank: int,
    world: int,
    build_model: bool,
    sentence_transformers: bool = False,
    teacher: bool = False,
) -> dict[str, str]:
    """Write the demo under ``out_dir`` on rank 0 (every rank then waits at a barrier; ``world`` > 1 needs the
    process group) and return the paths, the same on every rank.

    Always ``{"train", "val"}``: `write_text_pairs` (2 training rows per combination when ``quick``, else 6;
    ``seed`` picks the rows). With ``build_model``, ``"model"``: `build_tiny_bert` (``quick`` size; with
    ``sentence_transformers`` also the sentence-transformers files). With ``teacher``, ``"teacher"``: the
    folder `write_ideal_teacher` fills for the training rows.
    """
    paths = {"train": os.path.join(out_dir, "train.jsonl"), "val": os.path.join(out_dir, "val.jsonl")}
    if build_model:
        paths["model"] = os.path.join(out_dir, "model")
    if teacher:
        paths["teacher"] = os.path.join(out_dir, "teacher")
    if rank == 0:
        write_text_pairs(out_dir, per_combo=2 if quick else 6, seed=seed)
        if build_model:
            build_tiny_bert(paths["model"], quick, sentence_transformers=sentence_transformers)
        if teacher:
            write_ideal_teacher(paths["train"], paths["teacher"])
    if world > 1:
        torch.distributed.barrier()
    return paths
