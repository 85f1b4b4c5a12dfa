"""The trainer's one error type. Library code raises it with a message that names the file,
flag or record and what was expected; only ``train.main`` turns it into ``error: ...`` and an
exit status."""


class TrainingError(Exception):
    """A configuration, data or run-folder problem that stops a run before or during training."""
