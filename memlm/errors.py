"""User-facing errors: reported in one line by the CLI with exit code 2."""


class UserError(Exception):
    """Bad input from the user (config, data, checkpoint). The message names the key, file or field."""


class TrainingDiverged(Exception):
    """The training loss became NaN/inf. The CLI reports it in one line with exit code 1; the checkpoints
    written before the divergence are kept and the diverged state is not saved."""
