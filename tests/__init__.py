"""The test suite (a regular package: avalanche-lib installs a top-level `tests` package that would
otherwise shadow this namespace package)."""
