"""fisher-optax: compress JAX models with the Fisher information that Adam already computes.

Implements Tu, Berisha, Cao and Seo, "Reducing the Model Order of Deep Neural Networks
Using Information Theory" (ISVLSI 2016, https://arxiv.org/abs/1605.04859) on top of optax.
"""

__version__ = "0.1.0"

# Fisher from optimizer states; exact references.
# Trained quantization: fine-tune the codebooks after quantize.
from fisher_optax.codebooks import (
    ShareCodebooksState,
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
)

# Pruning: masks (sort-free exact selection), schedules, masked-training transforms.
from fisher_optax.masks import (
    LeafSparsity,
    SparsityReport,
    apply_mask,
    erk_sparsity,
    fisher_mask,
    is_kernel,
    magnitude_mask,
    random_mask,
    sparsity_report,
    topk_mask,
    two_stage_mask,
    uniform_sparsity,
)

# Structured sparsity patterns: N:M groups and (r, c) blocks over any score.
from fisher_optax.patterns import (
    BLOCK_REDUCTIONS,
    block_mask,
    block_selection,
    nm_mask,
    nm_selection,
)
from fisher_optax.quantize import (
    QuantizedParams,
    allocate_bits,
    dequantize,
    quantize,
)
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
    KeepPrunedState,
    PrunedState,
    keep_pruned,
    pruned,
)

__all__ = [
    "BLOCK_REDUCTIONS",
    "CRITERIA",
    "CompressionReport",
    "Criterion",
    "CriterionName",
    "FisherTrackerState",
    "KMeansResult",
    "KeepPrunedState",
    "LeafReport",
    "LeafSparsity",
    "PrunedState",
    "QuantizedParams",
    "ShareCodebooksState",
    "SparsityReport",
    "StreamReport",
    "__version__",
    "allocate_bits",
    "apply_mask",
    "block_mask",
    "block_selection",
    "compression_report",
    "constant_sparsity",
    "dequantize",
    "empirical_fisher",
    "erk_sparsity",
    "fisher_from_state",
    "fisher_mask",
    "fisher_tracker",
    "is_kernel",
    "keep_pruned",
    "kmeans_1d",
    "load_compressed",
    "magnitude_mask",
    "monte_carlo_fisher",
    "nm_mask",
    "nm_selection",
    "polynomial_sparsity",
    "pruned",
    "quantize",
    "random_mask",
    "requantize",
    "saliency",
    "save_compressed",
    "scores",
    "share_codebooks",
    "sparsity_report",
    "topk_mask",
    "two_stage_mask",
    "uniform_sparsity",
]
