"""Observability shared by every layer: log formats, Prometheus metrics, /healthz."""
