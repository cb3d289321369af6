"""The experiments behind the docs' results pages: the main job, the one-shot study, their
reports, networks and data loaders. Not installed with the package; run them from the
repository root as modules, e.g. ``python -m experiments.main_job``.
"""
