"""Shared fixtures. KVM tests skip only when /dev/kvm is absent; with
MINIVMM_REQUIRE_KVM=1 (set by .ci/run when /dev/kvm exists) that skip is a failure."""
import ctypes
import os
import signal
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


def in_child(body) -> str:
    """Run body() in a forked child; what it printed (one line), or how it hung/died."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            signal.alarm(5)              # a hang ends the child, and the test says so
            os.write(w, (body() + "\n").encode())
        except BaseException as e:
            os.write(w, f"raised {type(e).__name__}: {e}\n".encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        out = f.read().strip()
    _, status = os.waitpid(pid, 0)
    return out or f"no output, wait status {status}"


def failing_ioctl(real, request: int, err: int):
    """``real`` (one of _sys's raw ioctl entries) with ``request`` failing with ``err``."""
    def ioctl(fd, req, arg):
        if req == request:
            ctypes.set_errno(err)
            return -1
        return real(fd, req, arg)
    return ioctl
