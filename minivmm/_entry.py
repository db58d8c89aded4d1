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
    try:
        return cli_main()
    finally:
        _ignore_kicks()


def _ignore_kicks() -> None:
    """The process is done with its VMs: ignore the kick signal (SIGUSR1) from now on.
    Python's finalization puts every signal it has a handler for back to SIG_DFL
    (signalmodule.c, _PySignal_Fini), so a SIGUSR1 sent from outside, a no-op all run
    long, killed the process at its exit, after its output (status -10). SIG_IGN it leaves."""
    import signal
    from ._kick import KICK_SIGNAL, _no_op
    if signal.getsignal(KICK_SIGNAL) is _no_op:
        signal.signal(KICK_SIGNAL, signal.SIG_IGN)
