"""Dataset loaders and scenario generators; each module registers through an entry point in setup.cfg."""
