"""fisher-optax: compress JAX models with the Fisher information that Adam already computes.

Implements Tu, Berisha, Cao and Seo, "Reducing the Model Order of Deep Neural Networks
Using Information Theory" (ISVLSI 2016, https://arxiv.org/abs/1605.04859) on top of optax.
"""

__version__ = "0.1.0"

# --- Fisher from optimizer states and exact references (fisher.py, references.py)
from fisher_optax.fisher import FisherTrackerState, fisher_from_state, fisher_tracker
from fisher_optax.references import empirical_fisher, monte_carlo_fisher

__all__ = [
    "FisherTrackerState",
    "__version__",
    "empirical_fisher",
    "fisher_from_state",
    "fisher_tracker",
    "monte_carlo_fisher",
]
