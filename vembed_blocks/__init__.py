"""vembed-blocks: composable building blocks for training embedding models.

Every block lives in its own module and can be imported on its own; this package
re-exports the public names flat: ``from vembed_blocks import GradCache, InfoNCE``.
"""

from .colbert import maxsim
from .distributed import (
    gather_with_grad,
    gather_with_offset,
    get_rank,
    get_world_size,
    init_distributed,
    is_main_process,
)
from .losses import ColBERT, CoSENT, Distill, InfoNCE, Matryoshka, SigLIP, Triplet, mine_hard_negatives
from .pooling import pool

__version__ = "0.1.0"
