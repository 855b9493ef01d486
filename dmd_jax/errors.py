"""The one base class of errors that are the user's to fix, not dmd_jax's bugs."""


class UserError(Exception):
    """Bad input (config, data, workdir, checkpoint). Its message names the thing and the fix.

    The entry point prints it as one line, without a traceback (set DMD_TRACEBACK=1 to
    see one). Subclasses also derive from the matching builtin (ValueError, OSError...).
    """


class NonFiniteLossError(UserError, FloatingPointError):
    """Training diverged; raised before the diverged state could be checkpointed."""


class ConfigValueError(UserError, ValueError):
    """A config value outside what the setting accepts; the message gives the range."""


def check_positive(section, keys: tuple[str, ...], where: str, minimum: int = 1) -> None:
    """Sizes, counts and intervals: integers of at least `minimum`, or one clear error."""
    for key in keys:
        value = section[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ConfigValueError(f"{where}.{key}={value!r} must be an integer >= {minimum}")
