"""Exceptions raised by lowbit.

Every error lowbit raises on bad input is an :class:`InputError`; its message names what was wrong,
where (a file, a module name, a recipe key) and, when there is one, the fix.
"""


class LowbitError(Exception):
    """Base class of all lowbit errors."""


class InputError(LowbitError, ValueError):
    """Bad input: a missing file, an unknown name, a spec that does not fit, NaN weights, ..."""


class CorruptFileError(InputError):
    """A saved lowbit artifact is truncated, tampered with or not a lowbit artifact at all."""
