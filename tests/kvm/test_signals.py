"""The minivmm command under the signals a shell user can send it, other than Ctrl-C
(test_cli.py): a reader that goes away (`| head`), and a stop and continue (Ctrl-Z, fg)."""
import fcntl
import json
import os
import signal
import subprocess
import sys
import termios
import time

import pytest

from tests.conftest import ROOT, payload

_F_GETPIPE_SZ = 1032       # include/uapi/linux/fcntl.h (F_LINUX_SPECIFIC_BASE + 8)


def _to_closed_pipe(*args, timeout=60):
    """Run `python -m minivmm ARGS` with stdout a pipe whose reader is gone, as after
    `| head` has exited; (status, stderr). Block-buffered, as by default (python -u
    wrote each line at once, and met the closed pipe before the run's end)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    r, w = os.pipe()
    os.close(r)
    try:
        proc = subprocess.run([sys.executable, "-m", "minivmm", *map(str, args)], stdout=w,
                              stderr=subprocess.PIPE, text=True, timeout=timeout, cwd=ROOT,
                              env=env)
    finally:
        os.close(w)
    return proc.returncode, proc.stderr


@pytest.mark.parametrize("args", [
    # --trace writes from the vCPU's thread: the vCPU ended as a host-error, and a line
    # blamed the guest ("minivmm: vCPU 0: host-error: BrokenPipeError ..."), status 120
    ("run", payload("multi_vcpu"), "--trace"),
    ("run", payload("hello_long"), "--trace-ioctls"),
    ("dirty", "--iterations", "1", "--pages", "64", "--trace-ioctls"),
])
def test_a_reader_that_went_away_ends_the_run_quietly(args):
    # Python's last flush of stdout failed again at exit: "Exception ignored in: ...
    # BrokenPipeError" on stderr and status 120, not the status main() returned
    status, err = _to_closed_pipe(*args)
    assert (status, err) == (0, ""), err


@pytest.mark.parametrize("unbuffered", ["1", None])
def test_json_survives_a_trace_reader_that_went_away(unbuffered, tmp_path):
    # --json --trace: the trace is on stderr (2>&1 >out.json | head). Its reader gone is
    # not stdout's: the object was never written (status 120), or written and then
    # discarded when the vCPU's error line met the closed stderr
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    if unbuffered:
        env["PYTHONUNBUFFERED"] = unbuffered
    out = tmp_path / "out.json"
    r, w = os.pipe()
    os.close(r)
    try:
        with open(out, "w") as f:
            proc = subprocess.run([sys.executable, "-m", "minivmm", "run",
                                   payload("multi_vcpu"), "--json", "--trace"], stdout=f,
                                  stderr=w, timeout=60, cwd=ROOT, env=env)
    finally:
        os.close(w)
    summary = json.loads(out.read_text())
    assert len(summary["vcpus"]) == 4 and proc.returncode != 120
    # and it ends the trace, not the guests: they ended as host-error (BrokenPipeError)
    assert summary["ok"] is True and proc.returncode == 0, summary["vcpus"]


def _json_ok(text):
    return json.loads(text)["ok"] is True


def _ktap_passed(text):
    return text.splitlines()[-1] == "# Totals: pass:1 fail:0 xfail:0 xpass:0 skip:0 error:0"


@pytest.mark.parametrize("args, complete", [
    (("run", payload("hello_long"), "--json"), _json_ok),
    (("dirty", "--iterations", "1", "--pages", "64", "--json"), _json_ok),
    (("abi-check", "-k", "caps.api_version"), _ktap_passed),
])
def test_output_survives_an_ioctl_trace_reader_that_went_away(args, complete, tmp_path):
    # --trace-ioctls beside a machine's output is on stderr (2>&1 >out | head): its reader
    # gone ended the command at its next ioctl, status 0 and the JSON or KTAP never written
    out = tmp_path / "out"
    r, w = os.pipe()
    os.close(r)
    try:
        with open(out, "w") as f:
            proc = subprocess.run([sys.executable, "-m", "minivmm", *args, "--trace-ioctls"],
                                  stdout=f, stderr=w, timeout=60, cwd=ROOT)
    finally:
        os.close(w)
    assert proc.returncode == 0 and complete(out.read_text())


def test_abi_check_to_a_closed_pipe_says_so_once():
    status, err = _to_closed_pipe("abi-check", "-k", "ring.mmap")
    assert (status, err) == (2, "minivmm abi-check: cannot write the report to stdout: "
                                "Broken pipe\n"), err


def _pipe_is_full(fd: int) -> bool:
    held = bytearray(4)
    fcntl.ioctl(fd, termios.FIONREAD, held)
    return int.from_bytes(held, sys.byteorder) >= fcntl.fcntl(fd, _F_GETPIPE_SZ)


@pytest.mark.parametrize("unbuffered", ["1", None])
def test_stop_and_continue_while_writing_loses_no_output(unbuffered):
    # Ctrl-Z then fg while the JSON waits for room in a full pipe: the stop makes the
    # write(2) return short, and under PYTHONUNBUFFERED (python -u) the text layer drops
    # the rest (CPython gh-85393): the object was cut at 64 KiB, status 0
    env = dict(os.environ)
    env.pop("PYTHONUNBUFFERED", None)
    if unbuffered:
        env["PYTHONUNBUFFERED"] = unbuffered
    r, w = os.pipe()
    proc = subprocess.Popen([sys.executable, "-m", "minivmm", "dirty", "--iterations", "2",
                             "--pages", "8192", "--json"], stdout=w, stderr=subprocess.PIPE,
                            cwd=ROOT, env=env)
    os.close(w)
    try:
        deadline = time.monotonic() + 60
        while not _pipe_is_full(r):
            assert proc.poll() is None and time.monotonic() < deadline, "no output"
            time.sleep(0.01)
        time.sleep(0.3)                 # blocked in write(2) now: nothing reads the pipe
        for sig in (signal.SIGSTOP, signal.SIGCONT):
            proc.send_signal(sig)
            time.sleep(0.2)
        with os.fdopen(r, "rb") as reader:
            r = None
            out = reader.read()
        assert proc.wait(timeout=60) == 0, proc.stderr.read()
    finally:
        if r is not None:
            os.close(r)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    summary = json.loads(out)           # the whole object, not its first 64 KiB
    assert summary["ok"] and len(summary["runs"]) == 2


@pytest.mark.parametrize("args", [("step", "hello_long"), ("run", "hello_long")])
def test_a_storm_of_sigusr1_after_the_output_does_not_kill_at_exit(args):
    # SIGUSR1, minivmm's kick, has a no-op handler while minivmm runs; Python's
    # finalization put it back to SIG_DFL, and one more SIGUSR1 (`while kill -USR1 $pid`)
    # killed the process after its output: status -10
    proc = subprocess.Popen([sys.executable, "-m", "minivmm", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=ROOT)
    first = proc.stdout.readline()          # minivmm is loaded: its handler is in place
    deadline = time.monotonic() + 60
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            os.kill(proc.pid, signal.SIGUSR1)
        except ProcessLookupError:
            break
    out, err = proc.stdout.read(), proc.stderr.read()   # not communicate(): it reads the
    proc.wait(timeout=60)                   # fd, past what readline() buffered
    assert proc.returncode == 0, (proc.returncode, err)
    assert first and b"exited with code 0" in first + out
