"""Built-in strategies; importing this package registers them."""
from cl.strategies import baselines, replay  # noqa: F401  (registers built-ins)
