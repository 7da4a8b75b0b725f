"""The receive stage (Postfix's cleanup): inbound policy at MAIL and RCPT, then, for an
accepted message, the envelope, the transforms and the spool commit before the 250."""
