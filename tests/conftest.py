"""Shared fixtures. KVM tests skip only when /dev/kvm is absent; with
MINIVMM_REQUIRE_KVM=1 (set by .ci/run when /dev/kvm exists) that skip is a failure."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAYLOADS = ROOT / "guest_payloads"


def kvm_available() -> tuple:
    if not os.path.exists("/dev/kvm"):
        return False, "/dev/kvm does not exist on this machine"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False, "/dev/kvm exists but this user may not open it (not root, not in group kvm)"
    return True, ""


def run_cli(*args, timeout=60, env=None, input=None):
    """Run `python -m minivmm ARGS` and return the CompletedProcess (text mode)."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "minivmm", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env=full_env,
                          cwd=ROOT, input=input)


def payload(name: str) -> str:
    return str(PAYLOADS / f"{name}.asm")
