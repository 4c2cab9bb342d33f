"""Built-in strategies, one module per family; each registers through an entry point in setup.cfg."""
