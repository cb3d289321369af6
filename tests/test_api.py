"""The package's public surface: every module's ``__all__`` is re-exported, nothing else."""

import importlib
import pkgutil

import fisher_optax


def _public_modules():
    """Every module of the package except the private ones and the optional Flax module."""
    for info in pkgutil.iter_modules(fisher_optax.__path__):
        if not info.name.startswith("_") and info.name != "flax":
            yield info.name


def test_package_reexports_every_module_all():
    names = set()
    for name in _public_modules():
        names |= set(importlib.import_module(f"fisher_optax.{name}").__all__)
    assert set(fisher_optax.__all__) == names | {"__version__"}
    assert all(hasattr(fisher_optax, n) for n in fisher_optax.__all__)
    assert "fisher_from_state" in fisher_optax.__all__


def test_flax_module_all_names_exist():
    ff = importlib.import_module("fisher_optax.flax")
    assert all(hasattr(ff, n) for n in ff.__all__)
    assert not set(ff.__all__) & set(fisher_optax.__all__)  # Flax names stay in their module
