"""Checks of a Python caller's arguments, one helper for all of them.

An error names the keyword argument as a Python caller writes it (``pages``, not
``--pages``) and keeps that name in its ``argument`` attribute: the CLI says its option
there instead (``as_option``). Not a kernel interface.
"""
from __future__ import annotations


def named(error: Exception, argument: str | None) -> Exception:
    """``error``, marked as being about the keyword argument ``argument``."""
    error.argument = argument
    return error


def check_number(name: str, value, low=None, high=None, *, seconds: bool = False,
                 positive: bool = False, note: str = "", error=ValueError) -> None:
    """The argument ``name`` is an int (``seconds``: an int or a float) within low..high
    (``positive``: above 0), else a TypeError or ``error`` that says so, with ``note``
    after the range. A bool is refused: Python counts True as 1, but a count, an id or a
    register given True is a mistake, not a 1."""
    kinds = (int, float) if seconds else int
    if isinstance(value, bool) or not isinstance(value, kinds):
        what = "a number of seconds" if seconds else "an int"
        raise named(TypeError(f"{name} must be {what}, not {type(value).__name__}"), name)
    # written so that NaN, which compares false with everything, fails too
    if (low is None or value >= low) and (high is None or value <= high) \
            and (not positive or value > 0):
        return
    if positive:
        limit = "positive"
    elif low is not None and high is not None:
        limit = f"between {low} and {high}"
    else:
        limit = f"at least {low}" if low is not None else f"at most {high}"
    raise named(error(f"{name} must be {limit}{note} (got {value!r})"), name)


def check_type(name: str, value, kinds, what: str) -> None:
    """The argument ``name`` is an instance of ``kinds`` (``what`` says which in words),
    else a TypeError that says so: not an AttributeError from deep inside."""
    if not isinstance(value, kinds):
        raise named(TypeError(f"{name} must be {what}, not {type(value).__name__}"), name)


# keyword arguments whose option is not their name with dashes
_OPTIONS = {"breakpoint": "--break"}


def as_option(error: Exception) -> str:
    """The message of an API error as the CLI says it: the keyword argument it begins with
    becomes its option (pages -> --pages, max_time -> --max-time)."""
    text, name = str(error), getattr(error, "argument", None)
    if name and text.startswith(name):
        return _OPTIONS.get(name, "--" + name.replace("_", "-")) + text[len(name):]
    return text
