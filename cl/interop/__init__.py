"""Bridges to other continual-learning frameworks (optional extras)."""
