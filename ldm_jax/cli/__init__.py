"""The `ldm-jax` command line: one module per sub-command (`cmd_<name>.py` with `add_parser` and `run`)."""
