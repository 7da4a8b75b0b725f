"""The `relaygw` command and its subcommands."""
