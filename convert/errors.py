"""Errors raised while reading, mapping or writing checkpoints (reported by the CLI as one line)."""


class CheckpointError(Exception):
    """A checkpoint file is malformed, unsafe, unsupported or does not match the model."""
