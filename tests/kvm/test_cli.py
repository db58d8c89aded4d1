"""The minivmm command on the real /dev/kvm: output, JSON and exit statuses."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from minivmm.x86 import layout as L
from minivmm.cli import main as cli_main
from tests.conftest import ROOT, payload, run_cli
from tests.kvm.conftest import kvm_resets_at_shutdown, shutdown_like_svm
from tests.unit.test_cli_errors import one_line_error


def test_caps_json():
    proc = run_cli("caps", "--json")
    assert proc.returncode == 0, proc.stderr
    rep = json.loads(proc.stdout)
    assert rep["api_version"] == 12
    assert rep["vcpu_mmap_size"] >= 12288
    for cap in ("KVM_CAP_DIRTY_LOG_RING", "KVM_CAP_DIRTY_LOG_RING_ACQ_REL",
                "KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2"):
        assert cap in rep["capabilities"]
    assert rep["vendor_module"] in ("kvm_pvm", "kvm_intel", "kvm_amd", "unknown")
    assert "dirty ring" in rep["dirty_ring_verdict"]


def test_caps_text_has_a_verdict():
    proc = run_cli("caps")
    assert proc.returncode == 0 and "verdict: " in proc.stdout and "API version 12" in proc.stdout


def test_run_multi_vcpu_json_has_four_vcpus_each_with_its_line():
    proc = run_cli("run", payload("multi_vcpu"), "--vcpus", "4", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)          # exactly one JSON object
    assert out["mode"] == "long" and out["cpl"] == 3
    assert [v["console"] for v in out["vcpus"]] == [f"hello from vCPU {i}\n" for i in range(4)]
    for v in out["vcpus"]:
        assert v["end"]["reason"] == "exit-port" and v["end"]["code"] == 0
        assert v["end"]["instruction"].startswith("out 0xf4, al")
        assert v["exits"]["io"] == 19


def test_run_text_output_and_names():
    proc = run_cli("run", "hello_protected")
    assert proc.returncode == 0, proc.stderr
    assert "vCPU 0 | Hello from protected mode" in proc.stdout
    assert "vCPU 0 ended: hlt" in proc.stdout


def _printing(path, console: bytes):
    """A long-mode payload at ``path`` that sends ``console`` to port 0xe9 and exits 0."""
    path.write_text("    lea rsi, [rip + msg]\n    mov ecx, %d\n    mov dx, 0xe9\n"
                    "    rep outsb\n    xor eax, eax\n    out 0xf4, al\nmsg:\n    .byte %s\n"
                    % (len(console), ", ".join(str(b) for b in console)))
    return path


def test_run_text_escapes_the_guests_control_characters(tmp_path):
    # ESC [2J clears the screen, ESC [8m hides what follows (minivmm's own "ended" and
    # error lines), BEL, backspaces and the C1 CSI (U+009B) act on the terminal too
    console = b"\x1b[2J\x1b[8m\x07ok\x08\x08\x00\xc2\x9b\tx\n"
    src = _printing(tmp_path / "ctl.asm", console)
    proc = run_cli("run", src)
    assert proc.returncode == 0, proc.stderr
    assert not [c for c in proc.stdout if not c.isprintable() and c not in "\n\t"]
    assert "vCPU 0 | \\x1b[2J\\x1b[8m\\x07ok\\x08\\x08\\x00\\x9b\tx\n" in proc.stdout
    # --json keeps the bytes as they were (json.dumps escapes them)
    proc = run_cli("run", src, "--json")
    assert json.loads(proc.stdout)["vcpus"][0]["console"] == console.decode()


def test_run_text_breaks_lines_only_where_the_guest_did(tmp_path):
    # VT, FF, FS, NEL and U+2028 are no line breaks on a console: str.splitlines() made
    # them ones (shown as nothing), and the guest's blank lines were left out
    console = b"a\x0bb\x0cc\x1cd\xc2\x85e\xe2\x80\xa8f\r\ng\rh\n\n\ni\n"
    src = _printing(tmp_path / "lines.asm", console)
    proc = run_cli("run", src)
    assert proc.returncode == 0, proc.stderr
    shown = [l for l in proc.stdout.splitlines() if l.startswith("  vCPU 0 |")]
    assert shown == ["  vCPU 0 | a\\x0bb\\x0cc\\x1cd\\x85e\\u2028f", "  vCPU 0 | g",
                     "  vCPU 0 | h", "  vCPU 0 |", "  vCPU 0 |", "  vCPU 0 | i"], shown


def test_trace_prints_every_exit_with_its_instruction():
    proc = run_cli("run", "hello_long", "--trace")
    assert proc.returncode == 0
    lines = [l for l in proc.stdout.splitlines() if l.startswith("[vcpu0")]
    assert len(lines) == len("Hello from long mode\n") + 1
    assert all("by out 0xe9, al" in l for l in lines[:-1])
    assert "port=0xf4" in lines[-1] and "by out 0xf4, al" in lines[-1]


def test_payloads_and_disasm():
    proc = run_cli("payloads")
    assert proc.returncode == 0 and "hello_real" in proc.stdout and "multi_vcpu" in proc.stdout
    proc = run_cli("disasm", "hello_long")
    assert proc.returncode == 0 and "out 0xe9, al" in proc.stdout


@pytest.mark.parametrize("args,word", [
    (["--vcpus", "0"], "--vcpus must be"),
    (["--vcpus", "100000"], "between 1 and"),
    (["--pages", "0"], "at least 1"),
    (["--pages", str(L.MAX_DATA_PAGES + 1)], "more than this machine can map"),
])
def test_bad_sizes(args, word):
    assert word in one_line_error(run_cli("run", payload("hello_long"), *args))


@pytest.mark.parametrize("name,args,word", [
    ("spin", ["--timeout", "0.5"], "stopped by the timeout at 0x"),
    ("triple_fault", [], "triple fault"),
    ("mmio", [], "access outside RAM (MMIO): write of 4 byte(s) at 0xd0000000"),
    ("exception", [], "#GP"),
])
def test_guest_failures_exit_nonzero_with_one_line(name, args, word):
    proc = run_cli("run", payload(name), *args, timeout=30)
    line = one_line_error(proc, code=1)
    assert word in line


@pytest.mark.parametrize("host", ["this-host", "simulated-svm"])
def test_triple_fault_text_shows_registers(monkeypatch, capsys, host):
    if host == "simulated-svm":
        shutdown_like_svm(monkeypatch)
    # measured, not assumed: kvm_amd INITs the vCPU before this exit (svm.c
    # shutdown_interception()), kvm_pvm and kvm_intel keep the fault's registers
    reset = kvm_resets_at_shutdown()
    if host == "this-host":
        proc = run_cli("run", payload("triple_fault"))
        status, out = proc.returncode, proc.stdout
    else:                       # in this process, where Vcpu.run is patched
        status, out = cli_main(["run", payload("triple_fault")]), capsys.readouterr().out
    assert status == 1
    if reset:                   # the INIT state's registers are not shown as the fault's
        assert "registers lost" in out and "registers: rax=" not in out
    else:
        assert "registers: rax=" in out and "rip=0x10007" in out


def test_ctrl_c_stops_all_vcpus_and_exits_130():
    proc = subprocess.Popen([sys.executable, "-m", "minivmm", "run", payload("spin"),
                             "--vcpus", "3", "--timeout", "60"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1.5)
    start = time.monotonic()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == 130, (out, err)
    assert time.monotonic() - start < 5
    assert "interrupted" in err and "Traceback" not in err


def test_trace_names_the_out_that_made_the_exit(tmp_path):
    # RIP past `out 0xf0, eax` is at `out 0xf0, al`: that out would not make a
    # 4-byte exit, so the trace must name the one before it
    src = tmp_path / "outs.asm"
    src.write_text(";! mode: long\n    mov eax, 1\n    out 0xf0, eax\n    out 0xf0, al\n"
                   "    out 0xe9, al\n    out 0xe9, al\n    xor eax, eax\n    out 0xf4, al\n")
    proc = run_cli("run", src, "--trace")
    assert proc.returncode == 0, proc.stderr
    lines = [l for l in proc.stdout.splitlines() if l.startswith("[vcpu0")]
    assert len(lines) == 5
    for line, want in zip(lines, ["out 0xf0, eax  ; line 3", "out 0xf0, al  ; line 4",
                                  "out 0xe9, al  ; line 5", "out 0xe9, al  ; line 6",
                                  "out 0xf4, al  ; line 8"]):
        assert line.endswith("by " + want), line


@pytest.mark.parametrize("argv, refused, expected", [
    # the system slot (its size follows --vcpus, not --pages): a bare MemoryError was a
    # traceback
    (["run", "hello_long"], "slot 0", "cannot map 2097152 bytes for system"),
    # the guest-debug probe's one-page VM: its MachineError ("pages 1: ...") was a traceback
    (["step", "hello_long", "--count", "1"], "slot 1", "guest-debug probe VM"),
])
def test_guest_memory_the_host_refuses_is_one_line_with_status_1(monkeypatch, capsys, argv,
                                                                  refused, expected):
    import errno
    from minivmm import _sys
    real = _sys.mmap
    calls = []

    def mmap(fd, length, flags, prot, offset=0, what=""):
        if refused in what and not calls:     # the first such mapping only
            calls.append(what)
            raise OSError(errno.ENOMEM, "Cannot allocate memory")
        return real(fd, length, flags, prot, offset, what)
    monkeypatch.setattr(_sys, "mmap", mmap)
    status = cli_main(argv)
    err = capsys.readouterr().err
    assert calls, "the mapping was never asked for"
    assert status == 1 and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    assert expected in err and "Cannot allocate memory" in err


@pytest.mark.parametrize("command", [["run"], ["dirty", "--payload"]])
def test_a_vcpus_header_over_the_limit_blames_the_header_not_the_option(tmp_path, command):
    # no --vcpus given: the count KVM refuses came from the payload's header, but the
    # message said "--vcpus must be between 1 and ..."
    own = tmp_path / "own.asm"
    own.write_text(";! vcpus: 999999999\nxor eax, eax\nout 0xf4, al\n")
    line = one_line_error(run_cli(*command, own))
    assert line.startswith("minivmm: the payload's ';! vcpus:' header: vcpus must be "
                           "between 1 and "), line
    line = one_line_error(run_cli(*command, own, "--vcpus", "999999999"))
    assert line.startswith("minivmm: --vcpus must be between 1 and "), line


@pytest.mark.parametrize("args", [("run",), ("step", "--count", "2"), ("dirty-payload",)])
def test_json_of_a_payload_whose_name_is_not_utf8_is_strict_json(tmp_path, args):
    # the name b"x\xff" was written as "x\udcff", a lone surrogate a strict parser refuses
    # (serde_json; Python's json takes it, so the test encodes what it parsed)
    source = payload("dirty_seq" if args[0] == "dirty-payload" else "hello_long")
    odd = os.path.join(os.fsencode(tmp_path), b"x\xff.asm")
    with open(source, "rb") as f, open(odd, "wb") as out:
        out.write(f.read())
    argv = (["dirty", "--payload", odd, "--pages", "64", "--iterations", "1"]
            if args[0] == "dirty-payload" else [args[0], odd, *args[1:]])
    proc = subprocess.run([sys.executable, "-m", "minivmm", *argv, "--json"],
                          capture_output=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    for line in proc.stdout.decode("utf-8").splitlines():
        obj = json.loads(line)
        if "payload" in obj:
            assert obj["payload"].encode("utf-8") == b"x\\xff"


@pytest.mark.parametrize("unbuffered", ["1", ""], ids=["unbuffered", "buffered"])
@pytest.mark.parametrize("cmd", ["run", "step"])
def test_a_failed_guest_with_stderr_full_keeps_its_json_and_status(tmp_path, cmd, unbuffered):
    # 2>/dev/full: the vCPU's one line on stderr failed, and main() took it for stdout's
    # failure: fd 1 pointed at /dev/null before the buffered object was out (an empty
    # file), and status 120 (the error line's own failure at exit) or 2
    out = tmp_path / "out.json"
    with open(out, "w") as f, open("/dev/full", "w") as full:
        proc = subprocess.run([sys.executable, "-m", "minivmm", cmd, payload("triple_fault"),
                               "--json"], stdout=f, stderr=full, timeout=120, cwd=ROOT,
                              env=dict(os.environ, PYTHONUNBUFFERED=unbuffered))
    assert proc.returncode == 1
    assert not json.loads(out.read_text().splitlines()[-1])["ok"]


def test_a_full_non_blocking_stdout_is_an_output_failure():
    # a parent that set O_NONBLOCK on the pipe and reads nothing yet: the write's EAGAIN
    # was taken for the host running out ("write could not complete", status 1)
    import fcntl
    r, w = os.pipe()
    fcntl.fcntl(w, fcntl.F_SETFL, fcntl.fcntl(w, fcntl.F_GETFL) | os.O_NONBLOCK)
    try:
        proc = subprocess.Popen([sys.executable, "-m", "minivmm", "dirty", "--tracker",
                                 "bitmap", "--pages", "65536", "--iterations", "2", "--json"],
                                stdout=w, stderr=subprocess.PIPE, text=True, cwd=ROOT)
        os.close(w)
        err = proc.communicate(timeout=120)[1]
    finally:
        os.close(r)
    assert proc.returncode == 2, err
    assert err.splitlines() == ["minivmm: cannot write the output: write could not "
                                "complete without blocking"]


def test_run_names_the_vcpu_that_failed_not_one_the_timeout_stopped(tmp_path):
    # vCPU 2 faults while 0 and 1 loop: the one line named vCPU 0's timeout (the first bad
    # one by index) and hid the exception, the only failure of the guest's own
    src = tmp_path / "last_fails.asm"
    src.write_text("    cmp rdi, 2\n    jne spin\n    ud2\nspin:\n    jmp spin\n")
    proc = run_cli("run", src, "--vcpus", "3", "--timeout", "1", "--json")
    assert proc.returncode == 1
    ends = [v["end"]["reason"] for v in json.loads(proc.stdout)["vcpus"]]
    assert ends == ["timeout", "timeout", "exception"]
    assert proc.stderr.startswith("minivmm: vCPU 2: CPU exception #UD invalid opcode")
    assert proc.stderr.rstrip().endswith("(and 2 more vCPU(s))")
    assert proc.stderr.count("\n") == 1


def test_dirty_tracker_both_gives_each_run_the_whole_timeout():
    # The two VMs run one after the other, each under --timeout (README, dirty --help): the
    # README said "side by side", and nothing said a guest that never ends takes twice it
    t0 = time.monotonic()
    out = run_cli("dirty", "--payload", "spin", "--tracker", "both", "--iterations", "1",
                  "--pages", "64", "--timeout", "1", "--json")
    took = time.monotonic() - t0
    assert out.returncode == 1, out.stderr
    runs = json.loads(out.stdout)["runs"]
    assert [r["tracker"] for r in runs] == ["ring", "bitmap"]
    assert all(e["reason"] == "timeout" for r in runs for e in r["vcpu_ends"]), runs
    assert took >= 2.0, took            # 1 s each, not 1 s in all
