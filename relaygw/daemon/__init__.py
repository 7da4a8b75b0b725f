"""The daemon: the one wiring module, the service tree, reload, the control socket,
listeners, and the SMTP worker processes."""
