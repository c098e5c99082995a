"""Rewrite rules, one module per pattern family, each a list of `Rewrite` rows."""
