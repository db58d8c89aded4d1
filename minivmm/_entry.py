"""The `minivmm` command (and `python -m minivmm`): loads the CLI, then runs it. Not a kernel ABI.

Loading takes a few hundred ms (numpy, capstone, keystone); a Ctrl-C in that time gets
the same one line and status 130 as one during a command (minivmm/cli.py).
"""
import sys


def interrupted(error: BaseException) -> bool:
    """True for a Ctrl-C, also one Python handed on inside another exception: 3.11 wraps
    whatever a descriptor's __set_name__ raises in a RuntimeError, and classes with such
    descriptors (an Enum's members, functools.cached_property) are made while numpy,
    capstone and the standard library load."""
    for _ in range(8):
        if isinstance(error, KeyboardInterrupt):
            return True
        if error is None:
            break
        error = error.__cause__
    return False


def main() -> int:
    try:
        from .cli import main as cli_main
    except (KeyboardInterrupt, RuntimeError) as e:
        if not interrupted(e):
            raise
        print("minivmm: interrupted", file=sys.stderr)
        return 130
    return cli_main()
