"""Observability: structured logs, Prometheus metrics, and the scripts' progress bars."""
