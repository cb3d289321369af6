"""The package's public surface: every module's ``__all__`` is re-exported, nothing else."""

import importlib
import pkgutil

import fisher_optax
import fisher_optax._types

# Modules that take Flax models: imported on their own (``import fisher_optax.flax``), their
# names stay in the module and are not re-exported at the top; so do obs's (fisher_optax.obs).
_MODEL_MODULES = ("flax", "depgraph", "obs")


def _public_modules():
    """Every module of the package except the private ones and the model modules."""
    for info in pkgutil.iter_modules(fisher_optax.__path__):
        if not info.name.startswith("_") and info.name not in _MODEL_MODULES:
            yield info.name


def test_package_reexports_every_module_all():
    # the type aliases and is_kernel live in private modules and are exported at the top
    names = set(fisher_optax._types.__all__) | {"is_kernel"}
    for name in _public_modules():
        names |= set(importlib.import_module(f"fisher_optax.{name}").__all__)
    assert set(fisher_optax.__all__) == names | {"__version__"}
    assert all(hasattr(fisher_optax, n) for n in fisher_optax.__all__)
    assert "fisher_from_state" in fisher_optax.__all__


def test_model_modules_all_names_exist_and_stay_in_their_module():
    for name in _MODEL_MODULES:
        module = importlib.import_module(f"fisher_optax.{name}")
        assert all(hasattr(module, n) for n in module.__all__), name
        assert not set(module.__all__) & set(fisher_optax.__all__), name
