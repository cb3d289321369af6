"""fisher-optax: compress JAX models with the Fisher information that Adam already computes.

Implements Tu, Berisha, Cao and Seo, "Reducing the Model Order of Deep Neural Networks
Using Information Theory" (ISVLSI 2016, https://arxiv.org/abs/1605.04859) on top of optax.
Each module defines its own ``__all__``; this file re-exports them.
"""

__version__ = "0.1.0"

# Fisher from optimizer states; exact references.
from fisher_optax import fisher as _fisher
from fisher_optax import references as _references
from fisher_optax.fisher import FisherTrackerState, fisher_from_state, fisher_tracker
from fisher_optax.references import empirical_fisher, monte_carlo_fisher

# Datasets for the examples (NumPy only; scikit-learn imported lazily).
from fisher_optax import datasets as _datasets
from fisher_optax.datasets import (
    Dataset,
    load_digits_dataset,
    load_fashion_mnist,
    load_mnist_format,
    read_idx,
    write_idx,
)

# Structured pruning: unit scores and masks, optimizer state after surgery (Flax-free).
from fisher_optax import structured as _structured
from fisher_optax.structured import expand_unit_mask, slice_opt_state, unit_mask, unit_scores

# Pruning: masks (sort-free exact selection), schedules, masked-training transforms.
from fisher_optax import masks as _masks
from fisher_optax.masks import (
    apply_mask,
    fisher_mask,
    magnitude_mask,
    random_mask,
    sparsity_report,
    topk_mask,
    two_stage_mask,
)
from fisher_optax import schedules as _schedules
from fisher_optax import transforms as _transforms
from fisher_optax.schedules import constant_sparsity, polynomial_sparsity
from fisher_optax.transforms import KeepPrunedState, PrunedState, keep_pruned, pruned

# Quantization: 1-D k-means, Fisher bit allocation, weight sharing.
from fisher_optax import export as _export
from fisher_optax import kmeans as _kmeans
from fisher_optax import quantize as _quantize
from fisher_optax.export import compression_report, load_compressed, save_compressed
from fisher_optax.kmeans import KMeansResult, kmeans_1d
from fisher_optax.quantize import QuantizedParams, allocate_bits, dequantize, quantize

__all__ = [
    "__version__",
    *_masks.__all__,
    *_schedules.__all__,
    *_transforms.__all__,
    *_fisher.__all__,
    *_references.__all__,
    *_datasets.__all__,
    *_structured.__all__,
    *_kmeans.__all__,
    *_quantize.__all__,
    *_export.__all__,
]
