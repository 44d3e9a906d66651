"""User-facing errors: reported in one line by the CLI with exit code 2."""


class UserError(Exception):
    """Bad input from the user (config, data, checkpoint). The message names the key, file or field."""


def not_utf8(path, e: UnicodeDecodeError) -> UserError:
    """The one-line error for a text file that does not decode as UTF-8."""
    return UserError(f"{path}: not UTF-8 text (undecodable byte at offset {e.start})")


class TrainingDiverged(Exception):
    """The training loss became NaN/inf. The CLI reports it in one line with exit code 1; the checkpoints
    written before the divergence are kept and the diverged state is not saved."""


class NonFiniteOutput(ValueError):
    """The model produced NaN/inf where an evaluation needs a number (a token NLL). The CLI reports it in one
    line with exit code 1; results written before it (finished PG-19 books) are kept."""


# Appended to NonFiniteOutput messages: the one known way a trained model here produces NaN on valid input.
DIVERGENCE_HINT = ("a Titans memory's chunked inner update can diverge on a long stream or a run of identical tokens; "
                   "model.titans.inner_grad_clip > 0 bounds it")
