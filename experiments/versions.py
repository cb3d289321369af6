"""What computed a cached phase: part of every cache key of the experiments."""

import hashlib
import json
from pathlib import Path

import jax
import jaxlib
import numpy as np
import optax


def code_version(root: Path | None = None) -> str:
    """A hash of the code that computes the experiments' phases: the sources of the library,
    of the experiments and of the examples they import (not their tests) and the versions of
    jax, jaxlib, optax and numpy. Part of every cache key, so that a results page never mixes
    phases computed by two versions of the code. ``root``: the checkout (default: this one)."""
    h = hashlib.sha256()
    root = Path(root) if root is not None else Path(__file__).resolve().parents[1]
    for folder in ("fisher_optax", "experiments", "examples"):
        for path in sorted((root / folder).rglob("*.py")):
            if "tests" not in path.relative_to(root).parts:
                h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    versions = (jax.__version__, jaxlib.__version__, optax.__version__, np.__version__)
    h.update(json.dumps(versions).encode())
    return h.hexdigest()[:16]
