"""vembed-blocks: composable building blocks for training embedding models.

Every block lives in its own module and imports alone; this package re-exports the documented public
API flat (``from vembed_blocks import GradCache, InfoNCE``) and lazily (PEP 562): a name's module is
imported the first time the name is asked for, so ``from vembed_blocks import InfoNCE`` loads the
loss and what it needs, not PIL, transformers or the other blocks. ``__all__`` is that API; the
table below maps each name to the module that holds it (docs/layout.md has the same list).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module (relative to this package) that defines it
_EXPORTS: dict[str, str] = {
    # losses, pooling, GradCache, gradient sync
    **dict.fromkeys(["InfoNCE", "SigLIP", "Triplet", "CoSENT", "Distill"], "losses"),
    "Matryoshka": "matryoshka",
    "FalseNegatives": "false_negatives",
    **dict.fromkeys(["ColBERT", "maxsim"], "colbert"),
    **dict.fromkeys(["mine_hard_negatives", "write_mined_file"], "mining"),
    **dict.fromkeys(["pool", "POOL_METHODS"], "pooling"),
    **dict.fromkeys(["GradCache", "RandState", "RowSplit"], "gradcache"),
    **dict.fromkeys(["LengthSplit", "encode_in_length_chunks"], "length_chunks"),
    **dict.fromkeys(["defer_gradient_sync", "clip_gradients"], "grad_sync"),
    **dict.fromkeys(["StepGuard", "NonFiniteTrainingError", "BadDataError"], "step_guard"),
    **dict.fromkeys(
        [
            "init_distributed",
            "shutdown_distributed",
            "get_rank",
            "get_world_size",
            "gather_with_grad",
            "gather_with_offset",
            "average_gradients",
            "any_rank",
            "mean_over_ranks",
        ],
        "distributed",
    ),
    # models: parallelism, checkpoints, towers, text and VLM encoders, the trained-model encoder
    **dict.fromkeys(
        ["shard_model", "wrap_ddp", "checkpoint_layers", "compile_layers", "apply_lora", "unwrap_model"], "parallel"
    ),
    **dict.fromkeys(["save_checkpoint", "load_checkpoint", "latest_checkpoint"], "checkpoint"),
    "export_pretrained": "export",
    "refuse_non_finite": "step_guard",
    **dict.fromkeys(["UserError", "report_user_errors"], "user_errors"),
    **dict.fromkeys(["check_model_arg", "folder_kind"], "model_folders"),
    **dict.fromkeys(["InputCheck", "InputCheckError"], "input_check"),
    "check_embeddings": "metrics",
    **dict.fromkeys(["parse_columns", "parse_csv_delimiter"], "data.columns"),
    **dict.fromkeys(["make_scheduler", "warmup_steps", "warmup_cosine", "lr_multiplier"], "schedule"),
    **dict.fromkeys(
        ["ComposedDualEncoder", "compose_dual_encoder", "dual_encoder_features", "load_dual_encoder", "text_padding"],
        "towers",
    ),
    **dict.fromkeys(["load_text_encoder", "embed_texts", "export_text_encoder"], "text_encoder"),
    **dict.fromkeys(["load_vlm_processor", "vlm_embed", "vlm_token_embeddings", "shard_vlm", "VLMSplit"], "vlm"),
    **dict.fromkeys(["Encoder", "load_encoder"], "encoder"),
    # evaluation, logging, reports
    **dict.fromkeys(["retrieval_metrics", "search", "format_table", "recall_curve"], "metrics"),
    **dict.fromkeys(
        ["RetrievalSet", "retrieval_set", "embed_items", "embed_on_all_ranks", "evaluate_retrieval_by"], "embed"
    ),
    **dict.fromkeys(
        ["RunLog", "claim_run_folder", "write_args", "write_metrics", "save_metrics_before", "read_metrics_before"],
        "run_log",
    ),
    "write_report": "report",
    # data
    **dict.fromkeys(
        ["Item", "Record", "RecordError", "IndexedRecords", "read_records", "load_records"], "data.records"
    ),
    **dict.fromkeys(["load_image", "load_images"], "data.images"),
    **dict.fromkeys(
        ["TextCollator", "DualEncoderCollator", "VLMCollator", "FixedNegatives", "WithScores", "label_id"],
        "data.collate",
    ),
    "scatter_negatives": "data.collate",
    **dict.fromkeys(["WeightedTaskSampler", "parse_weights", "parse_group_weights"], "data.sampler"),
    **dict.fromkeys(
        ["TaskBatches", "TaskLoader", "task_loader", "training_batches", "file_fingerprint"], "data.loader"
    ),
    "load_task_dir": "data.row_files",
    **dict.fromkeys(["TaskPolicy", "TaskCollate", "read_task_table", "task_table_batches"], "task_table"),
    "published_defaults": "published",
    **dict.fromkeys(["open_stream", "StreamLoader", "is_stream_spec"], "data.shards"),
    **dict.fromkeys(["EmbedStore", "EmbedWriter"], "data.embed_store"),
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'vembed_blocks' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
