"""User errors that need no KVM: one line on stderr, non-zero exit, no traceback."""
import errno
import json
import os
import subprocess
import sys

import pytest

from minivmm import cli
from minivmm.kvm import Kvm
from minivmm._sys import KvmUnavailable
from tests.conftest import run_cli, payload


def one_line_error(proc, code=2):
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


def test_missing_device_names_it_and_the_fix():
    proc = run_cli("caps", env={"MINIVMM_KVM_DEVICE": "/nonexistent/kvm"})
    line = one_line_error(proc)
    assert "/nonexistent/kvm" in line and "ENOENT" in line and "modprobe" in line


def test_missing_device_for_run():
    proc = run_cli("run", payload("hello_long"), env={"MINIVMM_KVM_DEVICE": "/nonexistent/kvm"})
    assert "/nonexistent/kvm" in one_line_error(proc)


def test_permission_denied_names_the_group(monkeypatch):
    # root bypasses file modes, so the refusal is simulated at os.open; what is tested is
    # the message and the exit status, not KVM
    def deny(path, flags, *a):
        raise PermissionError(errno.EACCES, "Permission denied", path)
    monkeypatch.setattr(os, "open", deny)
    with pytest.raises(KvmUnavailable) as info:
        Kvm("/dev/kvm")
    assert "EACCES" in str(info.value) and "group" in str(info.value)
    assert cli.main(["caps"]) == 2


def test_missing_payload_file():
    line = one_line_error(run_cli("run", "/nonexistent/x.asm"))
    assert "not found" in line


def test_payload_that_does_not_assemble(tmp_path):
    bad = tmp_path / "bad.asm"
    bad.write_text(";! mode: long\nnop\nfrobnicate rax\n")
    line = one_line_error(run_cli("run", bad))
    assert line.startswith(f"minivmm: {bad}:3: ")


@pytest.mark.parametrize("header,word", [
    (";! mode: vm86\n", "unknown mode"),
    (";! cpl: 1\n", "unknown cpl"),
    (";! bogus: 1\n", "h.asm:1: unknown header 'bogus'"),
    (";! mode: long\n;! mode: real\n", "h.asm:2: header 'mode' given again (first on line 1)"),
])
def test_bad_header(tmp_path, header, word):
    f = tmp_path / "h.asm"
    f.write_text(header + "nop\n")
    assert word in one_line_error(run_cli("disasm", f))


@pytest.mark.parametrize("args,word", [
    (["--timeout", "-1"], "must be a positive number of seconds"),
    (["--timeout", "0"], "must be a positive number of seconds"),
    (["--vcpus", "x"], "not an integer"),
])
def test_bad_arguments(args, word):
    proc = run_cli("run", payload("hello_long"), *args)
    assert proc.returncode == 2 and word in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("args,word", [
    (["--pages", "010"], "a leading 0 is ambiguous"),          # it said "not an integer"
    (["--pages", "9" * 5000], "out of range: a number of 5000 digits"),
    # the default --writes (pages / 4) was checked first, as "--regs['r10']"
    (["--pages", "9" * 26], f"--pages {'9' * 26} is more than this machine can map"),
])
def test_bad_page_counts_are_named_as_such(args, word):
    assert word in one_line_error(run_cli("dirty", *args))


@pytest.mark.parametrize("cmd", [["run", "hello_long", "--pages"],
                                 ["run", "hello_long", "--vcpus"],
                                 ["dirty", "--iterations"], ["dirty", "--ring-entries"],
                                 ["dirty", "--payload", "dirty_random", "--seed"],
                                 ["step", "hello_long", "--vcpu"]])
def test_a_huge_hex_count_is_refused_in_one_short_line(cmd):
    # int() reads any number of hex digits; naming the value in decimal then raised
    # "Exceeds the limit (4300 digits)": a traceback, or that text as the one line
    line = one_line_error(run_cli(*cmd, "0x" + "f" * 5000,
                                  env={"MINIVMM_KVM_DEVICE": "/nonexistent/kvm"}))
    assert line.endswith("out of range: a number of 5000 hex digits "
                         f"(see minivmm {cmd[0]} --help)"), line


@pytest.mark.parametrize("cmd", ["run", "step"])
def test_real_mode_vcpus_beyond_what_ss_names(cmd):
    # needs no KVM: vCPU 24's stack would be at 1 MiB, past any 16-bit SS
    line = one_line_error(run_cli(cmd, "hello_real", "--vcpus", "25",
                                  env={"MINIVMM_KVM_DEVICE": "/nonexistent/kvm"}))
    assert line.startswith("minivmm: --vcpus must be between 1 and 24 for a real-mode payload")


@pytest.mark.parametrize("cmd", [["run", "hello_long"], ["dirty"], ["step", "spin"],
                                 ["abi-check"], ["caps"]])
def test_unknown_option_names_the_command(cmd):
    line = one_line_error(run_cli(*cmd, "--bogus"))
    assert line == (f"minivmm {cmd[0]}: unrecognized arguments: --bogus "
                    f"(see minivmm {cmd[0]} --help)")


@pytest.mark.parametrize("args,word", [
    (["--stride", "3"], "--stride sets R8, which dirty_seq never reads"),
    (["--seed", "3"], "--seed sets R9, which dirty_seq never reads"),
    (["--writes", "3"], "--writes sets R10, which dirty_seq never reads"),
    (["--payload", "dirty_stride", "--seed", "3"], "R9, which dirty_stride never reads"),
    (["--payload", "dirty_random", "--stride", "2"], "R8, which dirty_random never reads"),
])
def test_dirty_refuses_a_parameter_the_payload_ignores(args, word):
    # refused before any VM exists (no KVM needed)
    assert word in one_line_error(run_cli("dirty", *args))


def test_step_iterations_must_fit_rcx():
    line = one_line_error(run_cli("step", "dirty_seq", "--iterations", str(2 ** 64 + 1)))
    assert "--iterations must be between 0 and 18446744073709551615" in line


def test_machine_refuses_a_register_value_over_64_bits():
    from minivmm.machine import Machine, MachineError
    with pytest.raises(MachineError, match=r"regs\['rcx'\] must be between 0 and "
                                           r"18446744073709551615 \(got 18446744073709551616\)"):
        Machine(payload("hello_long"), regs={"rcx": 2 ** 64})
    with pytest.raises(MachineError, match=r"regs\['r8'\] must be between 0 and .* \(got -1\)"):
        Machine(payload("hello_long"), regs={"r8": -1})


def test_abicheck_list_as_json_needs_no_kvm():
    proc = run_cli("abi-check", "--list", "--format", "json", "-k", "caps.api_version",
                   env={"MINIVMM_KVM_DEVICE": "/nonexistent/kvm"})
    assert proc.returncode == 0, proc.stderr
    (check,) = json.loads(proc.stdout)["checks"]
    assert check["id"] == "caps.api_version" and check["rules"] == [6] and not check["unsafe"]
    line = one_line_error(run_cli("abi-check", "--list", "--format", "junit"))
    assert "not junit" in line



def _listed(*k):
    proc = run_cli("abi-check", "--list", "--format", "json", *k,
                   env={"MINIVMM_KVM_DEVICE": "/nonexistent/kvm"})
    assert proc.returncode == 0, proc.stderr
    return [c["id"] for c in json.loads(proc.stdout)["checks"]]


def test_abicheck_pattern_is_one_rule_a_glob_matched_anywhere_in_the_id():
    # -k reset took a substring but -k 'reset*' a glob of the whole id: the wildcard
    # narrowed "reset" (11 checks) to nothing at all
    reset = _listed("-k", "reset")
    assert len(reset) > 9 and "ring.enable.reset_without_ring" in reset
    for same in ("reset*", "*reset", "*reset*", "RESET", "r?set"):
        assert _listed("-k", same) == reset, same
    assert _listed("-k", "ring.*.zero") == ["ring.enable.zero"]
    assert _listed("-k", "caps.api_version") == ["caps.api_version"]


@pytest.mark.parametrize("pattern,word", [
    ("", "-k needs a pattern"),                   # was: every check, silently
    ("ring and not reset", "not a pytest-style expression"),
    ("ring[", "the [ at position 5 is never closed"),
    ("[!]", "the [ at position 1 is never closed"),
    ("no.such.check", "no check id matches"),
])
def test_abicheck_refuses_a_pattern_that_cannot_select(pattern, word):
    line = one_line_error(run_cli("abi-check", "-k", pattern,
                                  env={"MINIVMM_KVM_DEVICE": "/nonexistent/kvm"}))
    assert word in line

def test_help_lists_commands():
    proc = run_cli("--help")
    assert proc.returncode == 0
    for cmd in ("caps", "payloads", "disasm", "run"):
        assert cmd in proc.stdout


# Where a real Ctrl-C can land while numpy loads, before the command's own handler
# exists: an import hook raises the KeyboardInterrupt there, either directly or inside a
# descriptor's __set_name__ (an Enum's members, numpy's cached_property), which Python
# 3.11 hands on as a RuntimeError caused by it
_BOOM_DIRECT = "            raise KeyboardInterrupt\n"
_BOOM_IN_SET_NAME = ("            class Finfo:\n"
                     "                eps = Late()\n")


@pytest.mark.parametrize("boom", [_BOOM_DIRECT, _BOOM_IN_SET_NAME], ids=["direct", "set_name"])
def test_ctrl_c_while_the_modules_load_is_one_line(tmp_path, boom):
    script = tmp_path / "boom.py"
    script.write_text(
        "import sys\n"
        "class Late:\n"
        "    def __set_name__(self, owner, name):\n"
        "        raise KeyboardInterrupt\n"
        "class Boom:\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name == 'numpy':\n"
        + boom +
        "sys.meta_path.insert(0, Boom())\n"
        "sys.argv = ['minivmm', 'payloads']\n"
        "from minivmm._entry import main\n"
        "sys.exit(main())\n")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 130 and proc.stderr == "minivmm: interrupted\n", proc.stderr


def test_every_public_name_loads():
    import minivmm
    for name in minivmm.__all__:
        assert getattr(minivmm, name).__name__ == name
    from minivmm.machine import MachineError
    assert minivmm.MachineError is MachineError and issubclass(MachineError, Exception)


def test_dirty_refuses_a_parameter_a_users_payload_never_names(tmp_path):
    own = tmp_path / "own.asm"
    own.write_text(";! mode: long\n    xor eax, eax\n    out 0xf4, al\n")
    line = one_line_error(run_cli("dirty", "--payload", own, "--stride", "2"))
    assert "--stride sets R8, which own never reads" in line


@pytest.mark.parametrize("release,words", [
    ("6.18.44-fc-v595", "is at or past the fix (6.18.33)"),
    ("6.18.2", "is BEFORE the fix (6.18.33)"),
    ("5.10.200", "is not affected: the dirty ring it is in came with 5.11"),
    ("6.3.1", "no fixed release known for the 6.3 line"),
    # digits after a non-digit are no part of the number: not 6.6.301, 6.181
    ("6.6.30_1", "is BEFORE the fix (6.6.141)"),
    ("6.18rc1", "is BEFORE the fix (6.18.33)"),
])
def test_the_cve_line_of_the_abicheck_header(release, words):
    from minivmm.abicheck.runner import cve_line
    assert words in cve_line(release)


def test_a_kvm_error_survives_pickling():
    # A worker process's KvmError reaches the parent pickled; OSError's reduce called
    # KvmError(errno, strerror), which failed (TypeError) in the parent
    import pickle
    from minivmm._sys import KvmError
    for err in (KvmError("KVM_RUN", errno.EINVAL, "a hint"),
                KvmUnavailable("open /dev/kvm", errno.ENOENT, None)):
        back = pickle.loads(pickle.dumps(err))
        assert type(back) is type(err) and str(back) == str(err)
        assert (back.call, back.errno, back.hint) == (err.call, err.errno, err.hint)


@pytest.mark.parametrize("source", [
    "mov rax, " + "9" * 5000 + "\nout 0xf4, al\n",              # an operand
    ".equ BIG, " + "9" * 5000 + "\nxor eax, eax\nout 0xf4, al\n",  # a constant
])
def test_a_decimal_literal_past_4300_digits_is_refused_in_one_line(tmp_path, source):
    # int() refuses more than 4300 decimal digits (sys.get_int_max_str_digits()): its
    # ValueError was a traceback, where a 5000-digit hex literal was a clean refusal
    big = tmp_path / "big.asm"
    big.write_text(source)
    line = one_line_error(run_cli("disasm", big))
    assert f"{big}:1: value 999999999999...(5000 characters) does not fit in 64 bits" in line


def test_a_vcpus_header_past_4300_digits_is_refused_in_one_line(tmp_path):
    big = tmp_path / "big.asm"
    big.write_text(";! vcpus: " + "9" * 5000 + "\nxor eax, eax\nout 0xf4, al\n")
    line = one_line_error(run_cli("disasm", big))
    assert f"{big}:1: vcpus must be a positive integer of at most 9 digits" in line
    listed = run_cli("payloads", "--dir", tmp_path)       # the listing says so, too
    assert listed.returncode == 0 and "(bad header: " in listed.stdout, listed.stderr


def _with_stdout(stdout, *args, env=None, close=False):
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", "minivmm", *map(str, args)], stdout=stdout,
                          stderr=subprocess.PIPE, text=True, timeout=60, env=full_env,
                          preexec_fn=(lambda: os.close(1)) if close else None)


@pytest.mark.parametrize("unbuffered", ["1", ""], ids=["unbuffered", "buffered"])
@pytest.mark.parametrize("args", [("payloads",), ("disasm", "hello_long")])
def test_output_to_a_full_disk_is_one_line_and_status_2(args, unbuffered):
    # > /dev/full: a traceback and status 1 (PYTHONUNBUFFERED) or "Exception ignored"
    # and status 120 at the interpreter's exit, where abi-check says it in one line
    with open("/dev/full", "w") as full:
        proc = _with_stdout(full, *args, env={"PYTHONUNBUFFERED": unbuffered})
    line = one_line_error(proc)
    assert line == "minivmm: cannot write the output: No space left on device"


@pytest.mark.parametrize("unbuffered", ["1", ""], ids=["unbuffered", "buffered"])
@pytest.mark.parametrize("args", [("--help",), ("dirty", "--help"), ("--version",)])
def test_help_into_a_full_disk_is_one_line_and_status_2(args, unbuffered):
    # argparse ignores a failed write of its help: "Exception ignored" and status 120 at
    # the interpreter's exit; unbuffered, nothing and status 0. (_prepare_streams puts a
    # buffer under an unbuffered stdout, which keeps the failed write for main's flush.)
    with open("/dev/full", "w") as full:
        proc = _with_stdout(full, *args, env={"PYTHONUNBUFFERED": unbuffered})
    line = one_line_error(proc)
    assert line == "minivmm: cannot write the output: No space left on device"


@pytest.mark.parametrize("args", [("payloads",), ("run", "hello_long", "--trace"),
                                  ("caps", "--trace-ioctls")])
def test_a_closed_stdout_is_one_line_and_status_2(args):
    # >&-: print() dropped every line (status 0, nothing shown), and --trace or
    # --trace-ioctls raised AttributeError (a host-error end, or a traceback). Refused
    # before any KVM, as abi-check refuses it
    proc = _with_stdout(subprocess.DEVNULL, *args, close=True)
    assert one_line_error(proc) == "minivmm: cannot write the output: stdout is closed"


@pytest.mark.parametrize("encoding", ["ascii", "latin-1", "utf-8"])
def test_text_the_locale_cannot_encode_is_escaped_not_a_traceback(tmp_path, encoding):
    # a description with a character outside the locale's charset (ASCII, and U+2192 for
    # ISO-8859-1), and a file name that is not UTF-8 (surrogates, which even a UTF-8 locale
    # with strict errors, as en_US.UTF-8 has, cannot write): UnicodeEncodeError tracebacks
    (tmp_path / "arrow.asm").write_text(";! description: a \u2192 b\nxor eax, eax\n"
                                        "out 0xf4, al\n")
    odd = os.path.join(os.fsencode(tmp_path), b"\xff.asm")
    with open(odd, "w") as f:
        f.write("xor eax, eax\nout 0xf4, al\n")
    env = {"PYTHONIOENCODING": encoding}
    listed = run_cli("payloads", "--dir", tmp_path, env=env)
    assert listed.returncode == 0 and "Traceback" not in listed.stderr, listed.stderr
    assert ("a \u2192 b" if encoding == "utf-8" else "a \\u2192 b") in listed.stdout
    shown = subprocess.run([sys.executable, "-m", "minivmm", "disasm", odd],
                           capture_output=True, timeout=60, env=dict(os.environ, **env))
    assert shown.returncode == 0 and b"Traceback" not in shown.stderr, shown.stderr
    assert b"\\udcff.asm: long mode" in shown.stdout


def test_an_empty_kvm_device_variable_means_the_default(monkeypatch):
    # MINIVMM_KVM_DEVICE= opened "" ("open  failed: ENOENT ... load the kvm module"),
    # where an empty MINIVMM_PAYLOADS is the default directory
    opened = []

    def fake_open(path, flags, *a):
        opened.append(path)
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", path)
    monkeypatch.setenv("MINIVMM_KVM_DEVICE", "")
    monkeypatch.setattr(os, "open", fake_open)
    with pytest.raises(KvmUnavailable):
        Kvm()
    assert opened == ["/dev/kvm"]


@pytest.mark.parametrize("cmd", ["disasm", "run", "step"])
def test_an_empty_payload_name_is_said_to_be_empty(cmd):
    # Path("") is ".": the error was ".: is a directory, not a payload file"
    assert "no payload named (got '')" in one_line_error(run_cli(cmd, ""))


@pytest.mark.parametrize("text", ["0o10", "0b11", "1_0", "0x_10", "\u0661\u0660", "\u00b2",
                                  " 10", "10 ", "+5", "0x", "1e3", "010"])
def test_a_count_is_decimal_or_hex_in_ascii_digits_and_nothing_else(text):
    # int(text, 0) took octal, binary, underscores, spaces and any script's digits (an
    # Arabic-Indic "10" ran 10 pages), none of which --help or the README shows
    line = one_line_error(run_cli("dirty", "--pages", text))
    assert line.startswith(f"minivmm dirty: argument --pages: not an integer: {text!r} ("), line


@pytest.mark.parametrize("text,value", [("10", 10), ("0x10", 16), ("0XfF", 255), ("0", 0),
                                        ("-3", -3)])
def test_a_count_in_decimal_or_hex_is_taken(text, value):
    args = cli.build_parser().parse_args(["dirty", "--pages", text])
    assert args.pages == value            # a negative one is refused later, by its range
    assert "A count is decimal, or hex after 0x." in \
        cli.build_parser().commands["dirty"].format_help()


def test_json_escapes_the_bytes_of_a_name_that_is_not_utf8():
    # a lone surrogate (a payload file named b"x\xff") was written as "\udcff", which no
    # strict JSON parser takes; a character past U+FFFF is still its pair of escapes
    text = cli.json_text({"payload": "x\udcff", "console": "\U0001f600", "k": ["\udcfe"]})
    assert text == '{"payload": "x\\\\xff", "console": "\\ud83d\\ude00", "k": ["\\\\xfe"]}'
    assert json.loads(text)["payload"].encode("utf-8") == b"x\\xff"


def _with_fds(*args, env=None, stdout_read_only=False, stderr_full=False):
    def child():
        if stdout_read_only:     # 1</dev/null: open, but not for writing (EBADF)
            os.dup2(os.open(os.devnull, os.O_RDONLY), 1)
        if stderr_full:
            os.dup2(os.open("/dev/full", os.O_WRONLY), 2)
    return subprocess.run([sys.executable, "-m", "minivmm", *map(str, args)],
                          capture_output=True, text=True, timeout=60, preexec_fn=child,
                          env=dict(os.environ, **(env or {})))


@pytest.mark.parametrize("unbuffered", ["1", ""], ids=["unbuffered", "buffered"])
@pytest.mark.parametrize("args", [("payloads",), ("--help",)])
def test_a_stdout_opened_read_only_is_one_line_and_status_2(args, unbuffered):
    # 1</dev/null: a traceback ending in "OSError: [Errno 9] Bad file descriptor", then
    # "Exception ignored" and status 120 (--help: status 120 alone)
    proc = _with_fds(*args, stdout_read_only=True, env={"PYTHONUNBUFFERED": unbuffered})
    assert one_line_error(proc) == "minivmm: cannot write the output: Bad file descriptor"


@pytest.mark.parametrize("unbuffered", ["1", ""], ids=["unbuffered", "buffered"])
@pytest.mark.parametrize("read_only_stdout", [False, True])
def test_an_error_with_nowhere_to_say_it_is_still_status_2(read_only_stdout, unbuffered):
    # 2>/dev/full: the one line could not be written, and its OSError (a traceback that
    # could not be written either) ended in status 120
    proc = _with_fds("run", "/nonexistent/x.asm", stderr_full=True,
                     stdout_read_only=read_only_stdout, env={"PYTHONUNBUFFERED": unbuffered})
    assert proc.returncode == 2 and proc.stdout == ""


@pytest.mark.parametrize("encoding", ["utf-8", ""])
def test_main_in_process_gives_back_the_callers_streams_and_trace(encoding):
    # under python -u, main() put its own line-buffered stdout in sys.stdout and left it
    # there: the caller's print(end="") waited for a newline; --trace-ioctls stayed on, into
    # that stream; a strict stdout stayed reconfigured to backslashreplace
    code = ("import sys\nfrom minivmm import cli, _sys\n"
            "before = sys.stdout, sys.stderr, sys.stdout.errors\n"
            "cli.main(['payloads', '--trace-ioctls'])\n"
            "after = sys.stdout, sys.stderr, sys.stdout.errors\n"
            "print('SAME' if after == before and _sys.tracer is None else after, end='')\n"
            "import os; os._exit(0)\n")      # no final flush: a partial line must be out
    proc = subprocess.run([sys.executable, "-u", "-c", code], capture_output=True, text=True,
                          timeout=60, env=dict(os.environ, PYTHONIOENCODING=encoding))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.endswith("SAME"), proc.stdout[-300:]


def test_a_memory_error_without_a_message_still_says_what_ran_out(monkeypatch, capsys):
    # numpy raises a bare MemoryError() (np.unique under `ulimit -v`, found with
    # `minivmm dirty --pages 131072 --tracker bitmap`): the line was "minivmm: " and nothing
    from minivmm import payload as P

    def exhausted(*args, **kwargs):
        raise MemoryError()
    monkeypatch.setattr(P, "list_payloads", exhausted)
    assert cli.main(["payloads"]) == 1
    assert capsys.readouterr().err == "minivmm: out of memory\n"


@pytest.mark.parametrize("err, filename, expected", [
    # `ulimit -n 30; minivmm dirty --vcpus 8`: the VM's fds left none for numpy's lazy
    # import of numpy.ma inside np.unique, and the OSError was a traceback
    (errno.EMFILE, "/venv/numpy/ma/__init__.py",
     "minivmm: Too many open files: /venv/numpy/ma/__init__.py"),
    (errno.EAGAIN, None, "minivmm: cannot start what was asked"),
])
def test_the_host_running_out_is_one_line_with_status_1(monkeypatch, capsys, err, filename,
                                                        expected):
    from minivmm import payload as P

    def exhausted(*args, **kwargs):
        if filename is None:
            raise OSError(err, "cannot start what was asked")
        raise OSError(err, os.strerror(err), filename)
    monkeypatch.setattr(P, "list_payloads", exhausted)
    assert cli.main(["payloads"]) == 1
    assert capsys.readouterr().err == expected + "\n"


@pytest.mark.parametrize("mode, says", [
    (0o600, "is mode 0600, so members of its group"),
    (0o660, "add your user to group"),
], ids=["0600", "0660"])
def test_permission_denied_says_whether_the_group_would_help(monkeypatch, tmp_path, mode, says):
    # a 0600 root:root /dev/kvm told the user to join the group owning it, which changes
    # nothing: only a device whose group may read and write it is opened by joining
    dev = tmp_path / "kvm"
    dev.touch()
    dev.chmod(mode)
    def deny(path, flags, *a):
        raise PermissionError(errno.EACCES, "Permission denied", path)
    monkeypatch.setattr(os, "open", deny)
    with pytest.raises(KvmUnavailable) as info:
        Kvm(str(dev))
    assert says in str(info.value) and "run as root" in str(info.value)


@pytest.mark.parametrize("device,errno_name", [("/nonexistent/kvm", "ENOENT"), ("/", "EISDIR")])
def test_a_kvm_device_from_the_environment_is_named_as_such(device, errno_name):
    # README: the error messages mention MINIVMM_KVM_DEVICE; only ENOTTY's did, and a stale
    # value was told to modprobe (ENOENT) or given no hint at all (EISDIR)
    line = one_line_error(run_cli("caps", env={"MINIVMM_KVM_DEVICE": device}))
    assert errno_name in line and f"{device} is MINIVMM_KVM_DEVICE's" in line, line


def test_a_kvm_device_given_by_the_caller_does_not_blame_the_environment(monkeypatch):
    monkeypatch.setenv("MINIVMM_KVM_DEVICE", "/dev/kvm")
    with pytest.raises(KvmUnavailable) as info:
        Kvm("/nonexistent/kvm")
    assert "MINIVMM_KVM_DEVICE" not in str(info.value)


def test_a_device_that_is_not_kvm_blames_the_environment_only_when_it_came_from_it(
        monkeypatch):
    # ENOTTY's hint always said "(check MINIVMM_KVM_DEVICE)", also to a caller's own
    # Kvm("/dev/null"), and never said how to get back to /dev/kvm when the path was the
    # variable's (the hint() the open errors go through was shadowed by a local)
    monkeypatch.delenv("MINIVMM_KVM_DEVICE", raising=False)
    with pytest.raises(KvmUnavailable) as info:
        Kvm("/dev/null")
    assert "is it the KVM device?" in str(info.value)
    assert "MINIVMM_KVM_DEVICE" not in str(info.value)
    monkeypatch.setenv("MINIVMM_KVM_DEVICE", "/dev/null")
    with pytest.raises(KvmUnavailable) as info:
        Kvm()
    assert "is it the KVM device?" in str(info.value)
    assert "/dev/null is MINIVMM_KVM_DEVICE's: unset it to use /dev/kvm" in str(info.value)


@pytest.mark.parametrize("argv", [["--trace-ioctls", "caps"], ["--json", "caps"],
                                  ["--trace-ioctls", "payloads", "--bogus"]])
def test_an_option_before_the_command_is_not_blamed_on_the_command(argv):
    # it said "minivmm caps: unrecognized arguments: --trace-ioctls", which caps --help lists
    line = one_line_error(run_cli(*argv))
    assert line.startswith(f"minivmm: unrecognized arguments: {argv[0]} (before COMMAND"), line
    assert "options go after it" in line


def _early_option_cases():
    """(command, the option's words) for every option of every command but --help."""
    for name, command in cli.build_parser().commands.items():
        for action in command._actions:
            if action.option_strings and action.option_strings[0] not in ("-h", "--help"):
                words = [action.option_strings[0]]
                if action.nargs != 0:   # a value: "1", or one of its choices
                    words.append(action.choices[0] if action.choices else "1")
                yield name, words


@pytest.mark.parametrize("command,words", list(_early_option_cases()),
                         ids=lambda v: " ".join(v) if isinstance(v, list) else v)
def test_any_command_option_before_the_command_says_so(command, words, capsys):
    # `minivmm --timeout 5 run X` said "argument COMMAND: invalid choice: '5'": argparse
    # took the value of an option it did not know for the command
    with pytest.raises(SystemExit) as done:
        cli.main([*words, command, "hello_long"])
    assert done.value.code == 2
    line, = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"minivmm: unrecognized arguments: {' '.join(words)} (before "
                           "COMMAND"), line


def test_an_option_value_before_the_command_is_not_taken_for_the_command():
    line = one_line_error(run_cli("--timeout", "5", "run", "hello_long"))
    assert line.startswith("minivmm: unrecognized arguments: --timeout 5 (before COMMAND"), line
    for argv in (["--help", "run"], ["--vers", "run"]):     # main's own options still work
        proc = run_cli(*argv)
        assert proc.returncode == 0 and proc.stdout.startswith(("usage:", "minivmm ")), proc


def test_payloads_refuses_an_empty_dir():
    # it listed the shipped payloads, as if no --dir had been given
    assert one_line_error(run_cli("payloads", "--dir", "")) == \
        "minivmm: --dir needs a directory name"


@pytest.mark.parametrize("text", ["\u0661", "1_0", " 5", "5 ", "+5", "0x10", "1,5"])
def test_seconds_are_ascii_decimal_as_counts_are(text):
    # float() took underscores, spaces and any script's digits: --timeout ١ was 1 s
    line = one_line_error(run_cli("run", "hello_long", "--timeout", text))
    assert line.startswith(f"minivmm run: argument --timeout: not a number of seconds: "
                           f"{text!r}"), line


@pytest.mark.parametrize("text,value", [("10", 10.0), ("0.5", 0.5), (".5", 0.5), ("5.", 5.0),
                                        ("1e-3", 0.001), ("1E2", 100.0)])
def test_seconds_in_decimal_are_taken(text, value):
    args = cli.build_parser().parse_args(["step", "x", "--timeout", text, "--max-time", text])
    assert args.timeout == value and args.max_time == value


@pytest.mark.parametrize("fmt", ["json", "junit"])
def test_abicheck_skip_report_is_valid_with_any_device_path(fmt):
    # A MINIVMM_KVM_DEVICE path that is not UTF-8, or holds a control character, went
    # into the skipped report as it was: the JSON said "\udcff" (no character; RFC 8259
    # 8.2), the JUnit document a raw 0xff byte and a \x01, which no XML parser takes
    import xml.dom.minidom
    env = dict(os.environb)
    env[b"MINIVMM_KVM_DEVICE"] = b"/nonexistent/kvm\xff\x01"
    proc = subprocess.run([sys.executable, "-m", "minivmm", "abi-check", "--format", fmt],
                          capture_output=True, env=env, timeout=60,
                          cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    assert proc.returncode == 4, proc.stderr
    text = proc.stdout.decode("utf-8")          # strict: the document says UTF-8
    if fmt == "json":                           # \u0001 is JSON's own escape
        skipped = json.loads(text)["skipped"]
        assert "/nonexistent/kvm\\xff\x01 " in skipped, skipped
    else:
        doc = xml.dom.minidom.parseString(proc.stdout)
        skipped = doc.getElementsByTagName("property")[0].getAttribute("value")
        assert "/nonexistent/kvm\\xff\\x01 " in skipped, skipped
