"""vembed-blocks: composable building blocks for training embedding models.

Every block lives in its own module and can be imported on its own; this package
re-exports the public names flat: ``from vembed_blocks import GradCache, InfoNCE``.
"""

from .checkpoint import export_pretrained, latest_checkpoint, load_checkpoint, save_checkpoint
from .colbert import maxsim
from .data import (
    DualEncoderCollator,
    EmbedStore,
    EmbedWriter,
    IndexedRecords,
    Item,
    Record,
    RecordError,
    TaskBatches,
    TextCollator,
    VLMCollator,
    WeightedTaskSampler,
    label_id,
    load_image,
    load_records,
    load_task_dir,
    parse_group_weights,
    parse_weights,
    read_records,
    scatter_negatives,
)
from .distributed import (
    any_rank,
    average_gradients,
    gather_with_grad,
    gather_with_offset,
    get_rank,
    get_world_size,
    init_distributed,
    mean_over_ranks,
    shutdown_distributed,
)
from .embed import RetrievalSet, embed_items, retrieval_set
from .encoder import Encoder, load_encoder
from .grad_sync import accumulate_gradients, clip_gradients
from .gradcache import GradCache, RandState, RowSplit
from .losses import ColBERT, CoSENT, Distill, InfoNCE, Matryoshka, SigLIP, Triplet, mine_hard_negatives
from .metrics import retrieval_metrics, search
from .parallel import (
    apply_lora,
    checkpoint_layers,
    compile_layers,
    shard_model,
    unwrap_model,
    wrap_ddp,
)
from .pooling import pool
from .schedule import warmup_cosine
from .text_encoder import embed_texts, load_text_encoder
from .towers import ComposedDualEncoder, compose_dual_encoder, dual_encoder_features, load_dual_encoder
from .vlm import VLMSplit, load_vlm_processor, shard_vlm, vlm_embed, vlm_token_embeddings

__version__ = "0.1.0"
