"""Data blocks: records, images, collators, the weighted task sampler and its loader, streamed shards,
embedding stores. Each module imports alone; the names below load lazily (PEP 562), so importing one
data block does not load the others (``vembed_blocks.data.sampler`` does not load PIL).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, str] = {
    **dict.fromkeys(
        ["DualEncoderCollator", "FixedNegatives", "TextCollator", "VLMCollator", "WithScores", "label_id"], "collate"
    ),
    "scatter_negatives": "collate",
    "scatter_negative_ids": "collate",
    **dict.fromkeys(["content_id", "content_ids"], "content_ids"),
    **dict.fromkeys(["EmbedStore", "EmbedWriter", "StoreError", "collate_embeddings", "ensure_meta"], "embed_store"),
    **dict.fromkeys(["ImageLoadError", "ShardImage", "load_image", "load_images"], "images"),
    **dict.fromkeys(["TaskBatches", "TaskLoader", "file_fingerprint", "task_loader", "training_batches"], "loader"),
    **dict.fromkeys(["parse_columns", "parse_csv_delimiter"], "columns"),
    **dict.fromkeys(
        [
            "IMAGE_EXTENSIONS",
            "IndexedRecords",
            "Item",
            "Record",
            "RecordError",
            "RecordReader",
            "load_records",
            "read_records",
        ],
        "records",
    ),
    "load_task_dir": "row_files",
    **dict.fromkeys(["WeightedTaskSampler", "parse_group_weights", "parse_weights"], "sampler"),
    **dict.fromkeys(["TokenBudgetSampler", "lengths_for", "row_lengths"], "length_batches"),
    "ShardReader": "shard_stream",
    **dict.fromkeys(["DatasetSource", "ShardError", "ShardSet"], "shard_formats"),
    **dict.fromkeys(["StreamLoader", "expand_shards", "is_stream_spec", "open_stream"], "shards"),
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'vembed_blocks.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
