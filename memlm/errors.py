"""User-facing errors: reported in one line by the CLI with exit code 2."""


class UserError(Exception):
    """Bad input from the user (config, data, checkpoint). The message names the key, file or field."""
