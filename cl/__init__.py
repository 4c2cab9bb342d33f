"""cl: a continual-learning benchmark framework."""
__version__ = "0.1.0"
