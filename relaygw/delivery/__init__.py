"""Delivery: the courier contract, the couriers (SMTP relay to smarthosts and MX hosts,
Maildir), DNS lookups off the reactor thread, and bounce (DSN) building."""
