"""The queue: the durable spool and its content objects, per-recipient state, the
scheduler that attempts, retries, expires and bounces, and read-only inspection."""
