"""The one base class of errors that are the user's to fix, not dmd_jax's bugs."""


class UserError(Exception):
    """Bad input (config, data, workdir, checkpoint). Its message names the thing and the fix.

    The entry point prints it as one line, without a traceback (set DMD_TRACEBACK=1 to
    see one). Subclasses also derive from the matching builtin (ValueError, OSError...).
    """


class NonFiniteLossError(UserError, FloatingPointError):
    """Training diverged; raised before the diverged state could be checkpointed."""
