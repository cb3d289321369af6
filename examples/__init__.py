"""Examples of fisher-optax: runnable scripts and the modules they share (not installed).

``python examples/reproduce.py`` runs as a script; its sibling modules import as
``examples.datasets``, ``examples.models`` and ``examples.report`` from the repository root
(the tests import them so).
"""
