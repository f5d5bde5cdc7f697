"""Data blocks: records, images, collators, the weighted task sampler, streamed shards, embedding stores."""

from .collate import (
    DualEncoderCollator,
    FixedNegatives,
    TextCollator,
    VLMCollator,
    WithScores,
    label_id,
    scatter_negatives,
)
from .embed_store import EmbedStore, EmbedWriter, StoreError, collate_embeddings, ensure_meta
from .images import ImageLoadError, ShardImage, load_image, load_images
from .loader import TaskLoader
from .records import (
    IMAGE_EXTENSIONS,
    IndexedRecords,
    Item,
    Record,
    RecordError,
    RecordReader,
    load_records,
    read_records,
)
from .sampler import TaskBatches, WeightedTaskSampler, load_task_dir, parse_group_weights, parse_weights
from .shard_reader import ShardReader
from .shard_readers import DatasetSource, ShardError, ShardSet
from .shards import StreamLoader, expand_shards, is_stream_spec, open_stream

__all__ = [
    "DualEncoderCollator",
    "FixedNegatives",
    "TextCollator",
    "VLMCollator",
    "WithScores",
    "label_id",
    "scatter_negatives",
    "EmbedStore",
    "EmbedWriter",
    "StoreError",
    "collate_embeddings",
    "ensure_meta",
    "ImageLoadError",
    "load_image",
    "load_images",
    "IMAGE_EXTENSIONS",
    "IndexedRecords",
    "Item",
    "Record",
    "RecordError",
    "RecordReader",
    "load_records",
    "read_records",
    "TaskBatches",
    "TaskLoader",
    "WeightedTaskSampler",
    "load_task_dir",
    "parse_group_weights",
    "parse_weights",
    "ShardImage",
    "ShardReader",
    "DatasetSource",
    "ShardError",
    "ShardSet",
    "StreamLoader",
    "expand_shards",
    "is_stream_spec",
    "open_stream",
]
