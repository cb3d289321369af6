"""Sphinx configuration of the fisher-optax docs (``make docs``).

Guides and results pages are Markdown (MyST); the API reference is built from the
Google-style docstrings by autodoc and napoleon (each module page follows the module's
``__all__``).
"""

import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the package from this checkout, installed or not

import fisher_optax  # noqa: E402

project = "fisher-optax"
author = "fisher-optax contributors"
release = version = fisher_optax.__version__

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build"]

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "show-inheritance": False}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = True  # a NamedTuple's Attributes section would describe its fields twice

myst_enable_extensions = ["dollarmath"]
myst_heading_anchors = 3

html_theme = "furo"
html_title = f"fisher-optax {version}"
