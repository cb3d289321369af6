"""fisher-optax: compress JAX models with the Fisher information that Adam already computes.

Implements Tu, Berisha, Cao and Seo, "Reducing the Model Order of Deep Neural Networks
Using Information Theory" (ISVLSI 2016, https://arxiv.org/abs/1605.04859) on top of optax.
"""

__version__ = "0.1.0"

from fisher_optax import obs as obs  # its names stay in fisher_optax.obs
from fisher_optax._tree import is_kernel
from fisher_optax._types import (
    Fisher,
    Mask,
    Params,
    Prunable,
    Scores,
    Sparsity,
    SparsitySchedule,
)

# Fisher from optimizer states; exact references.
# Trained quantization: fine-tune the codebooks after quantize.
from fisher_optax.codebooks import (
    ShareCodebooksState,
    fake_quantize,
    reassign,
    requantize,
    share_codebooks,
)
from fisher_optax.export import (
    CompressionReport,
    LeafReport,
    StreamReport,
    compression_report,
    load_compressed,
    save_compressed,
)
from fisher_optax.fisher import (
    FisherTrackerState,
    fisher_from_state,
    fisher_tracker,
)

# Quantization: 1-D k-means, Fisher bit allocation, weight sharing, compressed export.
from fisher_optax.kmeans import (
    KMeansResult,
    kmeans_1d,
    kmeans_rows_host,
)

# Pruning: masks (sort-free exact selection), schedules, masked-training transforms.
from fisher_optax.masks import (
    LeafSparsity,
    SparsityReport,
    apply_mask,
    erk_sparsity,
    magnitude_mask,
    sparsity_report,
    two_stage_mask,
    uniform_sparsity,
)

# Selection patterns (unstructured, N:M groups, (r, c) blocks) and the one selection call.
from fisher_optax.patterns import (
    BLOCK_REDUCTIONS,
    NM,
    Blocks,
    Pattern,
    Unstructured,
    select,
)
from fisher_optax.quantize import (
    QuantizedParams,
    allocate_bits,
    dequantize,
    quantize,
    quantize_to_target,
)
from fisher_optax.rate import rate_penalty
from fisher_optax.references import (
    empirical_fisher,
    monte_carlo_fisher,
)
from fisher_optax.schedules import (
    constant_sparsity,
    polynomial_sparsity,
)
from fisher_optax.scores import (
    CRITERIA,
    Criterion,
    CriterionName,
    saliency,
    scores,
)
from fisher_optax.transforms import (
    PRUNING_METHODS,
    KeepPrunedState,
    PrunedState,
    keep_pruned,
    pruned,
)

__all__ = [
    "BLOCK_REDUCTIONS",
    "CRITERIA",
    "NM",
    "PRUNING_METHODS",
    "Blocks",
    "CompressionReport",
    "Criterion",
    "CriterionName",
    "Fisher",
    "FisherTrackerState",
    "KMeansResult",
    "KeepPrunedState",
    "LeafReport",
    "LeafSparsity",
    "Mask",
    "Params",
    "Pattern",
    "Prunable",
    "PrunedState",
    "QuantizedParams",
    "Scores",
    "ShareCodebooksState",
    "Sparsity",
    "SparsityReport",
    "SparsitySchedule",
    "StreamReport",
    "Unstructured",
    "__version__",
    "allocate_bits",
    "apply_mask",
    "compression_report",
    "constant_sparsity",
    "dequantize",
    "empirical_fisher",
    "erk_sparsity",
    "fake_quantize",
    "fisher_from_state",
    "fisher_tracker",
    "is_kernel",
    "keep_pruned",
    "kmeans_1d",
    "kmeans_rows_host",
    "load_compressed",
    "magnitude_mask",
    "monte_carlo_fisher",
    "polynomial_sparsity",
    "pruned",
    "quantize",
    "quantize_to_target",
    "rate_penalty",
    "reassign",
    "requantize",
    "saliency",
    "save_compressed",
    "scores",
    "select",
    "share_codebooks",
    "sparsity_report",
    "two_stage_mask",
    "uniform_sparsity",
]
