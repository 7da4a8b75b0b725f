"""SMTP worker processes: the main process's end (pool), the worker's end (process)
and what both share (channel)."""
