"""Shard schema, readers/writers, bundled + synthetic datasets and view recipes."""
