"""Datasets and scenario generators; importing this package registers them."""
from cl.scenarios import datasets, generators  # noqa: F401  (registers built-ins)
