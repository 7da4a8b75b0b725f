"""The SMTP protocol only: the inbound server, the outbound client, SASL, TLS, DATA
framing, argument grammar and replies. Knows no queue, delivery or configuration."""
