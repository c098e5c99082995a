"""The package version (pyproject.toml's): here, at the bottom of the layers, so that utils.py's
cache keys can name it without importing the package root."""
__version__ = "0.1.0"
