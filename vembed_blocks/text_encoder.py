"""Text encoders stored as plain Hugging Face folders or sentence-transformers folders.

A sentence-transformers folder is an HF model plus a few JSON files that say how token
states become one vector::

    modules.json                      [Transformer (path "" or "0_Transformer"), Pooling, Normalize?]
    1_Pooling/config.json             pooling mode: legacy ``pooling_mode_*_token(s)`` booleans or ``pooling_mode``
    sentence_bert_config.json         ``max_seq_length``, ``do_lower_case`` (next to the transformer; since
                                      sentence-transformers 5 the length is the tokenizer's model_max_length)
    config_sentence_transformers.json optional ``prompts`` ({"query": "...", ...})

`read_text_encoder_config` reads those into a `TextEncoderConfig` (for a plain HF folder:
mean pooling, L2-normalised, no length cap), `load_text_encoder` loads model + a
`TextCollator` (tokenizer, length cap, prompts), `text_features` runs model -> pooling ->
optional normalisation, `embed_texts` embeds a list of texts the way
``SentenceTransformer.encode`` does, and `write_st_files` adds
the JSON files to an exported HF folder so ``SentenceTransformer(folder)`` reproduces the
pooling the model was trained with. Files are found with ``transformers``' ``cached_file``, so
hub ids work as well as local folders. Not supported (a clear error): Dense/LayerNorm heads,
concatenated pooling modes, ``mean_sqrt_len_tokens`` and ``do_lower_case``.

Imports: torch and `vembed_blocks.pooling`; transformers, the collator and the batching
helper only inside the functions that use them.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch
import torch.nn.functional as F

from .pooling import pool

if TYPE_CHECKING:
    from .data.collate import TextCollator
    from .data.records import Item

__all__ = [
    "encode_text_items",
    "unit_text_encoder",
    "export_text_encoder",
    "TextEncoderConfig",
    "read_text_encoder_config",
    "load_text_encoder",
    "text_features",
    "embed_texts",
    "write_st_files",
]

# sentence-transformers pooling mode -> our `pool` method
_FROM_ST = {"mean": "mean", "cls": "cls", "max": "max", "weightedmean": "weighted_mean", "lasttoken": "last"}
_TO_ST = {ours: st for st, ours in _FROM_ST.items()}
# legacy boolean keys of 1_Pooling/config.json -> mode name
_LEGACY = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}


@dataclass
class TextEncoderConfig:
    """How to embed text with the model at ``path``.

    ``subfolder``: where the HF model lives inside ``path`` ("" = the root, as in
    all-MiniLM-L6-v2). ``pooling``: a `pool` method. ``normalize``: L2-normalise the pooled
    vector. ``max_length``: token cap (None = the tokenizer's). ``prompts``: named text
    prefixes (``"query"``, ``"document"``, ...). ``is_sentence_transformers``: read from ST files.
    """

    path: str
    subfolder: str = ""
    pooling: str = "mean"
    normalize: bool = True
    max_length: int | None = None
    prompts: dict[str, str] = field(default_factory=dict)
    is_sentence_transformers: bool = False


def _json(path: str, name: str) -> Any | None:
    """The parsed JSON file ``name`` of a local folder or hub repo, or None when it does not exist."""
    from transformers.utils import cached_file

    try:
        file = cached_file(path, name, _raise_exceptions_for_missing_entries=False)
    except OSError:  # offline and not cached, or not a repo at all: treat as absent
        file = None
    if file is None:
        return None
    with open(file, encoding="utf-8") as f:
        return json.load(f)


def _pooling_mode(cfg: dict[str, Any], where: str) -> str:
    """The single pooling mode of a 1_Pooling config (new ``pooling_mode`` key or legacy booleans)."""
    mode = cfg.get("pooling_mode")
    modes = [mode] if isinstance(mode, str) else list(mode or [])
    if mode is None:
        modes = [name for key, name in _LEGACY.items() if cfg.get(key)]
    if len(modes) != 1:
        raise NotImplementedError(f"{where}: exactly one pooling mode is supported, found {modes}")
    if modes[0] not in _FROM_ST:
        raise NotImplementedError(f"{where}: pooling mode {modes[0]!r} is not supported (have {sorted(_FROM_ST)})")
    return _FROM_ST[modes[0]]


def read_text_encoder_config(path: str | os.PathLike) -> TextEncoderConfig:
    """Read a sentence-transformers folder's modules; a plain HF folder gets the defaults.

    Raises ``NotImplementedError`` naming the module for anything `text_features` could not
    reproduce exactly (a Dense head, several pooling modes, lowercasing).
    """
    path = os.fspath(path)
    modules = _json(path, "modules.json")
    if modules is None:
        return TextEncoderConfig(path=path)
    out = TextEncoderConfig(path=path, normalize=False, is_sentence_transformers=True)
    for module in sorted(modules, key=lambda m: m.get("idx", 0)):
        kind, sub = module["type"].rsplit(".", 1)[-1], module.get("path", "")
        where = f"{path}/{sub or '.'} ({kind})"
        if kind == "Transformer":
            out.subfolder = sub
            st = (
                _json(path, os.path.join(sub, "sentence_bert_config.json") if sub else "sentence_bert_config.json")
                or {}
            )
            if st.get("do_lower_case"):
                raise NotImplementedError(f"{where}: do_lower_case=true is not supported; lowercase your texts")
            out.max_length = st.get("max_seq_length")
        elif kind == "Pooling":
            out.pooling = _pooling_mode(_json(path, f"{sub}/config.json") or {}, where)
        elif kind == "Normalize":
            out.normalize = True
        else:
            raise NotImplementedError(f"{where}: module type {module['type']!r} is not supported")
    out.prompts = dict((_json(path, "config_sentence_transformers.json") or {}).get("prompts") or {})
    return out


def load_text_encoder(
    path: str | os.PathLike,
    *,
    flag: str = "--model",
    pooling: str | None = None,
    max_length: int | None = None,
    query_prefix: str | None = None,
    doc_prefix: str | None = None,
    **model_kwargs: Any,
) -> tuple[torch.nn.Module, TextCollator, TextEncoderConfig]:
    """``(AutoModel, TextCollator, TextEncoderConfig)`` for a plain HF or sentence-transformers folder/id.

    The keyword arguments override what the folder says: ``pooling`` (a `pool` method),
    ``max_length`` (else the folder's ``max_seq_length``, else the tokenizer's ``model_max_length``,
    capped at 512 for a plain HF folder),
    ``query_prefix`` / ``doc_prefix`` (else the folder's ``"query"`` / ``"document"`` prompts).
    The returned config holds the resolved pooling and length; the collator the prefixes.
    ``flag``: the command-line flag ``path`` came from, named in the one-line `UserError` raised, before
    anything loads, for a folder of another kind (a CLIP folder, a vision backbone, a run folder, ...), a path
    that does not exist, or a hub id that cannot be fetched (`model_folders.check_model_arg`).
    """
    from transformers import AutoModel, AutoTokenizer

    from .data.collate import TextCollator
    from .model_folders import check_model_arg, hub_errors

    check_model_arg(flag, path, {"text"}, hub=True)
    cfg = read_text_encoder_config(path)
    kw = {"subfolder": cfg.subfolder} if cfg.subfolder else {}
    with hub_errors(flag, cfg.path):
        model = AutoModel.from_pretrained(cfg.path, **kw, **model_kwargs)
        tokenizer = AutoTokenizer.from_pretrained(cfg.path, **kw)
    cfg.pooling = pooling or cfg.pooling
    # sentence-transformers >= 5 keeps max_seq_length as the tokenizer's model_max_length; plain HF
    # tokenizers often say 1e30 there, so those are capped.
    cfg.max_length = (
        max_length or cfg.max_length or min(tokenizer.model_max_length, 10**6 if cfg.is_sentence_transformers else 512)
    )
    query = query_prefix if query_prefix is not None else cfg.prompts.get("query")
    doc = doc_prefix if doc_prefix is not None else cfg.prompts.get("document")
    return model, TextCollator(tokenizer, cfg.max_length, query_instruction=query, doc_instruction=doc), cfg


def text_features(
    model: torch.nn.Module, inputs: dict[str, torch.Tensor], pooling: str, normalize: bool
) -> torch.Tensor:
    """``model(**inputs).last_hidden_state[B, L, D]`` -> pooled ``[B, D]`` (L2-normalised if asked).

    ``inputs``: the tokenizer's tensors (``input_ids``, ``attention_mask``, ...). Works
    through DDP/FSDP wrappers (it only calls ``model(...)``).
    """
    hidden = model(**inputs).last_hidden_state
    emb = pool(hidden, inputs["attention_mask"], pooling)
    return F.normalize(emb, dim=-1) if normalize else emb


@torch.no_grad()
def embed_texts(
    model: torch.nn.Module,
    collator: TextCollator,
    cfg: TextEncoderConfig,
    texts: Sequence[str],
    is_query: bool,
    batch_size: int = 128,
    bf16: bool = False,
) -> torch.Tensor:
    """``Tensor[len(texts), D]`` (CPU, float32) in eval mode, batch by batch.

    Equal (to float rounding) to ``SentenceTransformer(folder).encode(texts)`` for the
    folders `read_text_encoder_config` accepts; queries get the collator's query prefix,
    documents its document prefix. The model's train/eval mode is restored afterwards.
    """
    from .data.records import Item
    from .embed import embed_items

    device, was_training = next(model.parameters()).device, model.training
    model.eval()

    def run(batch: list[str]) -> torch.Tensor:
        enc = collator.encode([Item(text=t) for t in batch], is_query)
        with torch.autocast(device.type, torch.bfloat16, enabled=bf16):
            return text_features(model, {k: v.to(device) for k, v in enc.items()}, cfg.pooling, cfg.normalize).float()

    try:
        return embed_items(list(texts), run, batch_size, "embed queries" if is_query else "embed documents")
    finally:
        model.train(was_training)


def write_st_files(
    out: str | os.PathLike,
    dim: int,
    pooling: str,
    normalize: bool,
    max_length: int | None = None,
    prompts: dict[str, str] | None = None,
) -> None:
    """Make the HF folder ``out`` (model at its root) a sentence-transformers folder too.

    Writes modules.json, 1_Pooling/config.json (legacy boolean keys, which every
    sentence-transformers version reads), sentence_bert_config.json and, with ``prompts``,
    config_sentence_transformers.json. ``dim``: the embedding width.
    """
    if pooling not in _TO_ST:
        raise ValueError(f"write_st_files: pooling {pooling!r} has no sentence-transformers equivalent")
    os.makedirs(os.path.join(out, "1_Pooling"), exist_ok=True)
    prefix = "sentence_transformers.models."
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": prefix + "Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": prefix + "Pooling"},
    ]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": prefix + "Normalize"})
        os.makedirs(os.path.join(out, "2_Normalize"), exist_ok=True)
    pool_cfg = {"word_embedding_dimension": dim, **{k: _TO_ST[pooling] == v for k, v in _LEGACY.items()}}
    files = {
        "modules.json": modules,
        "1_Pooling/config.json": pool_cfg,
        "sentence_bert_config.json": {"max_seq_length": max_length, "do_lower_case": False},
    }
    if prompts:
        files["config_sentence_transformers.json"] = {"prompts": prompts}
    for name, content in files.items():
        with open(os.path.join(out, name), "w", encoding="utf-8") as f:
            json.dump(content, f, indent=2)


def encode_text_items(
    model: torch.nn.Module,
    collator: TextCollator,
    cfg: TextEncoderConfig,
    items: Sequence[Item],
    is_query: bool,
    bf16: bool = False,
) -> torch.Tensor:
    """Embeddings ``[len(items), D]`` of text items in one forward, as the exported folder computes them
    (the folder's pooling and normalisation, the collator's prefixes); no gradient, mode left to the caller."""
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in collator.encode(list(items), is_query).items()}
    with torch.no_grad(), torch.autocast(device.type, torch.bfloat16, enabled=bf16):
        return text_features(model, inputs, cfg.pooling, cfg.normalize).float()


def unit_text_encoder(
    model: torch.nn.Module, collator: TextCollator, cfg: TextEncoderConfig, bf16: bool = False
) -> Callable[[Sequence[Item], bool], torch.Tensor]:
    """``encode(items, is_query)`` -> unit vectors of `encode_text_items`: what cosine retrieval and
    mining take (e.g. `embed.evaluate_retrieval`, `mining.write_mined_file`)."""
    return lambda items, is_query: F.normalize(encode_text_items(model, collator, cfg, items, is_query, bf16), dim=-1)


def export_text_encoder(model: torch.nn.Module, out: str, collator: TextCollator, cfg: TextEncoderConfig) -> None:
    """An HF folder (LoRA merged, `export_pretrained`) that is also a sentence-transformers folder.

    Every rank calls it (the export gathers sharded weights); rank 0 writes the
    sentence-transformers files with the pooling, normalisation, length and prompts in use.
    """
    from .distributed import get_rank
    from .export import export_pretrained

    export_pretrained(model, out, tokenizer=collator.tokenizer)
    if get_rank() == 0:
        prompts = {
            k: v for k, v in (("query", collator.query_instruction), ("document", collator.doc_instruction)) if v
        }
        write_st_files(out, model.config.hidden_size, cfg.pooling, cfg.normalize, cfg.max_length, prompts)
