"""The `minivmm` command (and `python -m minivmm`): loads the CLI, then runs it.

Loading takes a few hundred ms (numpy, capstone, keystone); a Ctrl-C in that time gets
the same one line and status 130 as one during a command (minivmm/cli.py).
"""
import sys


def main() -> int:
    try:
        from .cli import main as cli_main
    except KeyboardInterrupt:
        print("minivmm: interrupted", file=sys.stderr)
        return 130
    return cli_main()
