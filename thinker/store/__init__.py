"""Durable state: the SQLite database, futures, checkpoints on disk, adapter records, disk space."""
