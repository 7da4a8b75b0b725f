"""relaygw: an SMTP relay and forwarding gateway built on Twisted."""

__version__ = "0.1.0"
