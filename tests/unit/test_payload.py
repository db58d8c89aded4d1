"""Payload headers, assembly errors, the keystone watchdog and the listing (no KVM needed)."""
import contextlib
import errno
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from minivmm import payload as P
from tests.conftest import PAYLOADS


def asm(body, header=";! mode: long\n"):
    return P.assemble_source(header + body, "t.asm")


def test_every_shipped_payload_assembles_with_a_complete_listing():
    names = sorted(p.stem for p in PAYLOADS.glob("*.asm"))
    assert {"hello_real", "hello_protected", "hello_long", "multi_vcpu", "exception", "spin",
            "mmio"} <= set(names)
    for name in names:
        p = P.load(str(PAYLOADS / f"{name}.asm"))
        assert p.listing, name
        # instructions are contiguous except where data sits between them
        assert all(i.line > 0 and i.source for i in p.listing)


def test_header_defaults_and_values():
    p = asm("nop\n", header="")
    assert (p.mode, p.cpl, p.vcpus) == ("long", 3, None)
    p = asm("nop\n", header=";! mode: long   ; a comment\n;! cpl: 0\n;! vcpus: 3\n"
                            ";! description: says #hi\n")
    assert (p.mode, p.cpl, p.vcpus, p.description) == ("long", 0, 3, "says #hi")
    p = asm("nop\n", header=";! mode: real\n")
    assert (p.mode, p.cpl, p.origin, p.bits) == ("real", 0, 0, 16)


@pytest.mark.parametrize("expr", ["0x8000000000000000 / -1 | 0", "5 % 0 | 1", "1 / 0 ^ 2"])
def test_mixed_division_is_not_handed_to_keystone_in_process(expr):
    # keystone's signed division traps (SIGFPE) on these, killing whoever runs it: the
    # parent never evaluates them (the forked assembler reports them, if it must)
    proc = subprocess.run([sys.executable, "-c",
                           "from minivmm import payload as P\n"
                           f"print(P._evaluate({expr!r}, {{}}, directive=True))"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "None", proc.stderr


def test_description_keeps_its_semicolons():
    p = asm("nop\n", header=";! mode: long ; comment\n;! description: writes a; then b ; c\n")
    assert p.mode == "long" and p.description == "writes a; then b ; c"


@pytest.mark.parametrize("header,match", [
    (";! mode: banana\n", r"t.asm:1: unknown mode 'banana'"),
    (";! cpl: 2\n", r"t.asm:1: unknown cpl '2'"),
    (";! mode: real\n;! cpl: 3\n", r"t.asm:2: cpl 3 is only supported in long mode"),
    (";! vcpus: zero\n", r"t.asm:1: vcpus must be a positive integer"),
])
def test_bad_headers(header, match):
    with pytest.raises(P.PayloadError, match=match):
        asm("nop\n", header=header)


def test_assembly_error_names_file_and_line():
    with pytest.raises(P.PayloadError, match=r"^t.asm:4: "):
        asm("nop\nnop\nmov rax, rbx, rcx\nnop\n")   # header is line 1


def test_undefined_label_is_an_error_with_a_line():
    with pytest.raises(P.PayloadError, match=r"t.asm:3: "):
        asm("nop\njmp nowhere\n")


def test_truncated_operand_is_rejected_not_silently_assembled():
    # keystone alone would assemble this to a 7-byte instruction
    with pytest.raises(P.PayloadError, match=r"t.asm:2: (unbalanced brackets|incomplete)"):
        asm("mov rax, [rip+\n")
    with pytest.raises(P.PayloadError, match=r"t.asm:2: incomplete operand"):
        asm("add rax,\n")


def test_unbalanced_brackets():
    with pytest.raises(P.PayloadError, match=r"t.asm:2: unbalanced brackets"):
        asm("mov rax, [rbx\n")


def test_bang_line_that_hangs_keystone_is_refused():
    with pytest.raises(P.PayloadError, match=r"t.asm:2: unexpected '!'"):
        asm("! mode: long\n")


def test_watchdog_stops_a_hanging_assembler(monkeypatch):
    # feed keystone the input that loops forever, bypassing the syntax check
    monkeypatch.setattr(P, "ASSEMBLE_TIMEOUT_S", 1.0)
    with pytest.raises(P.PayloadError, match="did not finish within"):
        P._assemble_with_watchdog("! mode: long", "long", 0x10000, [(1, "! mode: long")], "h.asm")


def test_forked_child_leaves_ctrl_c_to_the_parent():
    from minivmm import _sys
    pid = _sys.fork_child()
    if pid == 0:
        os._exit(7 if signal.getsignal(signal.SIGINT) is signal.SIG_IGN else 8)
    assert os.WEXITSTATUS(_sys.reap(pid, kill=False)) == 7
    assert signal.getsignal(signal.SIGINT) is not signal.SIG_IGN


def test_ctrl_c_during_a_hung_assembly_kills_the_assembler(tmp_path):
    # Ctrl-C at a terminal reaches the whole process group: the parent must say one line,
    # kill the looping keystone child and exit (it used to wait for that child forever)
    script = tmp_path / "hang.py"
    script.write_text(
        "import sys, time\n"
        "from minivmm import payload as P\n"
        "P.ASSEMBLE_TIMEOUT_S = 60.0\n"
        "print('ready', flush=True)\n"
        "try:\n"
        "    P._assemble_with_watchdog('! mode: long', 'long', 0x10000,\n"
        "                              [(1, '! mode: long')], 'h.asm')\n"
        "except KeyboardInterrupt:\n"
        "    print('interrupted', file=sys.stderr)\n"
        "    sys.exit(130)\n")
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert proc.stdout.readline() == "ready\n"
        time.sleep(1.0)                    # the child is now looping inside keystone
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130 and err == "interrupted\n", err
    with pytest.raises(ProcessLookupError):  # no assembler left behind in the group
        os.killpg(proc.pid, 0)


def test_a_killed_parent_takes_the_hung_assembler_with_it(tmp_path):
    # The parent is the assembler's watchdog: SIGTERM or SIGHUP (kill PID, a closed
    # terminal) ends it at once, and the keystone child, reparented, looped for ever
    script = tmp_path / "hang.py"
    script.write_text(
        "from minivmm import payload as P\n"
        "P.ASSEMBLE_TIMEOUT_S = 60.0\n"
        "print('ready', flush=True)\n"
        "P._assemble_with_watchdog('! mode: long', 'long', 0x10000,\n"
        "                          [(1, '! mode: long')], 'h.asm')\n")
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        assert proc.stdout.readline() == "ready\n"
        deadline = time.monotonic() + 10
        while not (children := _children(proc.pid)):
            assert time.monotonic() < deadline, "no assembler child"
            time.sleep(0.05)
        time.sleep(0.5)                    # the child is now looping inside keystone
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == -signal.SIGTERM
        deadline = time.monotonic() + 10
        while any(_running(pid) for pid in children):
            assert time.monotonic() < deadline, "the assembler outlived its parent"
            time.sleep(0.05)
    finally:
        with contextlib.suppress(ProcessLookupError):   # the child stays in this group
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stdout.close()


def _children(pid: int) -> list:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(c) for c in f.read().split()]


def _running(pid: int) -> bool:
    """Alive and not a zombie (a dead child that init has not reaped yet)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_empty_payload():
    with pytest.raises(P.PayloadError, match="no instructions"):
        asm("; only a comment\n")


def test_missing_payload_file():
    with pytest.raises(P.PayloadError, match="not found"):
        P.load("/nonexistent/nothing.asm")


def test_semicolon_comments_are_not_statement_separators():
    p = asm("nop ; xor eax, eax\n")
    assert [i.text for i in p.listing] == ["nop"]


def test_decimal_immediates_stay_decimal_after_listings():
    # keystone reads decimals as hex once a sym_resolver was set anywhere in the process
    for _ in range(2):
        p = asm("mov al, 10\nlbl:\n.quad lbl\nmov cl, 10\n")
        assert p.code[:2] == b"\xb0\x0a" and p.listing[-1].raw == b"\xb1\x0a"


def test_listing_maps_lines_and_skips_data():
    p = asm("start:\n  lea rsi, [rip + msg]\n  jmp start\nmsg:\n  .asciz \"hi\"\n  nop\n")
    assert [(i.line, i.mnemonic) for i in p.listing] == [(3, "lea"), (4, "jmp"), (7, "nop")]
    lea, jmp, nop = p.listing
    assert lea.address == 0x10000 and jmp.address == lea.address + lea.size
    assert nop.address == jmp.address + jmp.size + 3     # "hi\0"
    assert p.instruction_ending_at(jmp.address + jmp.size) is jmp
    assert p.instruction_at(nop.address) is nop


def test_real_mode_code_is_assembled_for_ip_zero():
    p = asm("jmp here\nhere:\n  hlt\n", header=";! mode: real\n")
    assert p.listing[0].address == 0 and p.load_address == 0x10000


def test_list_payloads_reports_headers():
    rows = {r[0]: r for r in P.list_payloads(str(PAYLOADS))}
    assert rows["hello_real"][1] == "real" and rows["multi_vcpu"][3] == 4


@pytest.mark.parametrize("body,value,got", [
    ("mov al, 0x1234", "0x1234", "0x34"),
    ("mov al, 256", "0x100", "0x0"),
    ("mov al, -129", "-0x81", "0x7f"),
    ("mov eax, 0x123456789", "0x123456789", "0x23456789"),
    ("push 0x123456789", "0x123456789", "0x6789"),       # became a 16-bit push
    ("push 0xffffffff", "0xffffffff", "0xffff"),
    ("mov rax, [rbx + 0x123456789]", "0x123456789", "0x23456789"),
    ("mov rax, [rbx + 0xffffffff]", "0xffffffff", "-0x1"),   # would be rbx - 1
    ("lea rax, [rbx + rcx*8 + 0x123456789]", "0x123456789", "0x23456789"),
    ("mov byte ptr [rsi + 8], 0x1ff", "0x1ff", "0xff"),
    ("imul eax, ebx, 0x123456789", "0x123456789", "0x23456789"),
    ("ret 0x12345", "0x12345", "0x2345"),
    ("enter 16, 256", "0x100", "0x0"),
    ("mov al, 100h", "0x100", "0x0"),
    ("mov al, 2 * 0x80", "0x100", "0x0"),
    (".equ X, 0x1234\nmov al, X", "0x1234", "0x34"),
    (".set X, 0x12\n.equ Y, X + 0x1200\nmov al, Y", "0x1212", "0x12"),
    ("X = 0x1234\nmov al, X", "0x1234", "0x34"),
    # operators of mixed kinds, evaluated by keystone's own parser on 64 bits
    ("mov al, 0x100 | 1 << 4 + 1", "0x120", "0x20"),
    ("mov al, 1 + 2 << 8", "0x300", "0x0"),
    ("mov rax, [rbx + 1 + 1 << 32]", "0x200000000", "0x0"),
    (".set X, 1 + 2 << 8\nmov al, X", "0x300", "0x0"),
])
def test_values_keystone_truncates_are_refused(body, value, got):
    line = body.count("\n") + 2
    with pytest.raises(P.PayloadError, match=rf"^t.asm:{line}: value {value} does not fit in "
                                             rf"the operand \(assembled as {got}\)$"):
        asm(body + "\n")


@pytest.mark.parametrize("mode,body", [
    ("real", "mov ax, 0x12345"),
    ("real", "mov al, [0x12345]"),
    ("real", "mov ax, [bx + 0x10000]"),
    ("protected", "mov ax, 0x12345"),
])
def test_values_that_do_not_fit_in_16_and_32_bit_modes(mode, body):
    with pytest.raises(P.PayloadError, match=r"^t.asm:2: value 0x\w+ does not fit"):
        asm(body + "\n", header=f";! mode: {mode}\n")


@pytest.mark.parametrize("mode,body,code", [
    ("long", "mov al, -1", "b0ff"),
    ("long", "mov al, 255", "b0ff"),
    ("long", "mov al, -128", "b080"),
    ("long", "mov eax, -1", "b8ffffffff"),
    ("long", "mov rax, 0xffffffffffffffff", "48c7c0ffffffff"),
    ("long", "mov rax, -5", "48c7c0fbffffff"),
    ("long", "add rsp, -8", "4883c4f8"),
    ("long", "push -1", "6aff"),
    ("long", "movabs rax, 0x8000000000000000", "48b80000000000000080"),
    ("long", "mov rax, [rbx - 8]", "488b43f8"),
    ("long", "mov eax, [0x80000000]", "a10000008000000000"),
    ("long", "lea rax, [rbx + rcx*8 + 0x20]", "488d44cb20"),
    ("long", "mov rax, qword ptr fs:[rbx + 16]", "64488b4310"),
    ("long", "lock add qword ptr [rax + 8], 1", "f04883400801"),
    ("long", "ret 0xffff", "c2ffff"),
    ("long", "enter 0xffff, 0", "c8ffff00"),
    ("long", "imul eax, 10", "6bc00a"),
    ("long", "mov al, 'A'", "b041"),
    ("long", "mov al, 0x10 | 1 << 2 + 1", "b018"),        # mixed kinds that fit
    ("long", "mov al, 0 - 1 & 0xff + 0", "b0ff"),
    ("long", "mov eax, 010", "b808000000"),             # octal, as keystone reads it
    ("long", "mov eax, 0ffh", "b8ff000000"),
    ("long", "mov al, (1 << 4) | 1", "b011"),
    ("long", "X = 0x12\nmov al, X", "b012"),
    ("long", ".equ X, 0x12\nmov al, X", "b012"),
    ("long", "jmp 0x10005", "eb03"),
    ("long", "a: jmp a", "ebfe"),
    ("long", "lea rsi, [rip + msg]\nmsg: .byte 1", "488d350000000001"),
    ("real", "mov ax, -1", "b8ffff"),
    ("real", "mov ax, [bx + 0xffff]", "8b87ffff"),
    ("real", "mov si, msg\nmsg: .byte 0", "be030000"),
    ("protected", "mov eax, [ebx + 0xffffffff]", "8b43ff"),
])
def test_values_that_fit_are_accepted(mode, body, code):
    assert asm(body + "\n", header=f";! mode: {mode}\n").code.hex() == code


@pytest.mark.parametrize("body,match", [
    (".align abc\nnop", r"^t.asm:2: .align: the alignment must be a number, got 'abc'$"),
    (".align\nnop", r"^t.asm:2: .align needs an alignment$"),
    (".align 0\nnop", r"^t.asm:2: .align 0: the alignment must be a power of two"),
    ("nop\n.balign 3\nnop", r"^t.asm:3: .balign 3: the alignment must be a power of two"),
    (".align -1\nnop", r"^t.asm:2: .align -1: the alignment must be a power of two"),
    (".align 8192\nnop", r"^t.asm:2: .align 8192: the alignment must be a power of two"),
    (".p2align 40\nnop", r"^t.asm:2: .p2align 40 is out of range"),   # gigabytes of padding
    (".p2align x\nnop", r"^t.asm:2: .p2align: the alignment must be a number"),
    ("nop\n.align 8, 0x90, x\nnop", r"^t.asm:3: .align: bad arguments"),
])
def test_bad_alignment_is_a_one_line_error(body, match):
    with pytest.raises(P.PayloadError, match=match):
        asm(body + "\n")


@pytest.mark.parametrize("body,padding", [
    ("nop\n.align 8\nnop", 7),
    ("nop\n.p2align 2\nnop", 3),
    ("nop\n.balign 16, 0xcc\nnop", 15),
    ("nop\n.align 2*4\nnop", 7),
    ("A = 16\nnop\n.align A\nnop", 15),
    ("nop\n.align 8, 0x90, 7\nnop", 7),
    ("nop\n.align 8, 0x90, 3\nnop", 0),       # more than the max skip: no padding
    ("nop\n.p2align 3,,7\nnop", 7),
])
def test_alignment_is_accounted_for_in_the_listing(body, padding):
    p = asm(body + "\n")
    first, last = p.listing[0], p.listing[-1]
    assert last.address == first.address + 1 + padding and last.mnemonic == "nop"


@pytest.mark.parametrize("mode,fill,want", [
    ("long", ", 0x90", b"\x90" * 7), ("protected", ", 0x90", b"\x90" * 7),
    ("long", ", 0xcc", b"\xcc" * 7), ("long", ", -1", b"\xff" * 7),
    ("real", "", b"\x90" * 7), ("real", ", 0x90", b"\x90" * 7),
    ("real", ", 0x90, 7", b"\x90" * 7),
])
def test_alignment_padding_is_the_fill_asked(mode, fill, want):
    # keystone padded `.balign 8, 0x90` (and, in every mode, a fill left out) with its own
    # 7-byte NOP, 0f 1f 80 00 00 00 00: in real mode that runs as `nop word ptr [bx + si]`
    # and then `add byte ptr [bx + si], al`, so a real-mode guest running through its
    # padding wrote to memory
    p = asm(f"nop\n.balign 8{fill}\nnop\n", f";! mode: {mode}\n")
    assert p.code[1:8] == want
    if want == b"\x90" * 7:     # run through, it is nops only: nothing is written
        assert [i.mnemonic for i in P.disassemble(p.code, 0, mode)] == ["nop"] * 9


def test_alignment_with_no_fill_keeps_keystones_nops_where_they_decode():
    # 32- and 64-bit code: a multi-byte NOP, as GAS pads code; the listing is unchanged
    p = asm("nop\n.balign 8\nnop\n")
    assert [i.mnemonic for i in P.disassemble(p.code, 0, "long")] == ["nop"] * 3


def test_list_payloads_reports_unreadable_entries(tmp_path):
    (tmp_path / "good.asm").write_text(";! mode: real\nhlt\n")
    (tmp_path / "binary.asm").write_bytes(b"\xff\xfe\x00;! mode: long\n")
    (tmp_path / "folder.asm").mkdir()
    (tmp_path / "bom.asm").write_bytes(b"\xef\xbb\xbf;! mode: real\nhlt\n")
    os.mkfifo(tmp_path / "fifo.asm")        # opening it would wait for a writer forever
    rows = {r[0]: r for r in P.list_payloads(str(tmp_path))}
    assert rows["fifo"][1] == "?" and "not a regular file" in rows["fifo"][4]
    assert rows["good"][1] == "real" and rows["bom"][1] == "real"
    assert rows["binary"][1:4] == ("?", "?", None) and "not UTF-8" in rows["binary"][4]
    assert rows["folder"][1] == "?" and "unreadable" in rows["folder"][4]


def test_a_directory_is_not_a_payload_file(tmp_path):
    with pytest.raises(P.PayloadError, match=r"is a directory"):
        P.load(str(tmp_path))
    (tmp_path / "x.asm").mkdir()
    with pytest.raises(P.PayloadError, match=r"x.asm: is a directory"):
        P.load(str(tmp_path / "x.asm"))


def test_a_device_is_not_a_payload_file_but_a_pipe_is(tmp_path):
    # /dev/null was "payload file not found" though it exists; /dev/zero would be read
    # for ever
    for dev in ("/dev/null", "/dev/zero"):
        with pytest.raises(P.PayloadError, match=rf"^{dev}: not a regular file"):
            P.load(dev)
    # `minivmm run <(generate)`: the shell hands over a pipe, which is read
    r, w = os.pipe()
    os.write(w, b";! mode: real\nhlt\n")
    os.close(w)
    try:
        assert [i.mnemonic for i in P.load(f"/dev/fd/{r}").listing] == ["hlt"]
    finally:
        os.close(r)


def test_utf8_byte_order_mark_is_ignored(tmp_path):
    f = tmp_path / "bom.asm"
    f.write_bytes(b"\xef\xbb\xbf;! mode: real\nhlt\n")
    p = P.load(str(f))
    assert p.mode == "real" and p.code == b"\xf4" and p.listing[0].line == 2


def test_non_ascii_outside_a_comment_is_a_clear_error():
    asm("nop ; caf\u00e9\n")                 # in a comment: fine
    with pytest.raises(P.PayloadError, match=r"^t.asm:2: non-ASCII character '\u00e9'"):
        asm(".ascii \"caf\u00e9\"\n")


@pytest.mark.parametrize("mode,body,code", [
    ("long", "bt rax, - '['\n", "480fbae0a5"),            # a bracket in quotes is a number
    ("protected", "mov [esp + '['], ebx\n", "895c245b"),
    ("long", ".equ X, -1 >> 60\nmov rax, X\n", "48c7c00f000000"),   # unsigned in .equ
    ("long", "mov rax, -16 >> 2\n", "48c7c0fcffffff"),               # signed in operands
    ("long", "mov al, 510 / 2\n", "b0ff"),
    ("long", "mov rax, -7 / 2\n", "48c7c0fdffffff"),                 # truncates toward 0
    ("long", ".set X, 0x1234\nmov ax, X\n.set X, 1\nmov al, X\n", "66b83412b001"),
    ("long", "mov al, X\n.set X, 0x1234\n.set X, 1\n", "b001"),      # the last value
    ("long", ".word 0xffff, -32768\n", "ffff0080"),
    ("long", "nop\n.align 4, -1, 3\nnop\n", "90ffffff90"),
    ("long", "mov sil, [65536]\n", "408a35f9ffffff"),                # RIP-relative, right
    ("long", ".Lx: nop\n", "90"),
])
def test_valid_code_is_accepted(mode, body, code):
    assert asm(body, header=f";! mode: {mode}\n").code.hex() == code


@pytest.mark.parametrize("mode,body,match", [
    ("long", "target:\n" + "nop\n" * 200 + "loop target\n",
     r"^t.asm:203: target out of range for loop \(rel8: -128..127 bytes\)$"),
    ("protected", "jecxz .Lt\n" + "nop\n" * 200 + ".Lt: nop\n",
     r"^t.asm:2: target out of range for jecxz"),
    ("real", "target:\n" + "nop\n" * 200 + "loop target\n", r"^t.asm:203: target out of range"),
    ("long", ".word 0x10000\n", r"^t.asm:2: .word value 0x10000 does not fit in 16 bits$"),
    ("long", ".word -32769\n", r"^t.asm:2: .word value -0x8001 does not fit"),
    ("long", ".word 1, 0x12345\n", r"^t.asm:2: .word value 0x12345"),
    ("long", ".word 0x10000, 1\n", r"^t.asm:2: .word value 0x10000"),   # keystone hangs
    ("long", "mov rsp, gs:0x100000000\n", r"^t.asm:2: value 0x100000000 does not fit"),
    ("real", "mov ax, ds:0x12345\n", r"^t.asm:2: value 0x12345 does not fit"),
    ("long", "mov al, 512 / 2\n", r"^t.asm:2: value 0x100 does not fit"),
    ("long", ".set X, 1\nmov al, X\n.set X, 0x1234\nmov bl, X\n",
     r"^t.asm:5: value 0x1234 does not fit"),
    ("long", "mov rbx, [0x28]\n", r"^t.asm:2: address 0x28 was assembled as RIP-relative"),
])
def test_wrong_code_is_refused(mode, body, match):
    with pytest.raises(P.PayloadError, match=match):
        asm(body, header=f";! mode: {mode}\n")


@pytest.mark.parametrize("body,match", [
    ("nop\nmov rax, 0x10000000000000000\nnop\nout 0xf4, al\n",
     r"^t.asm:3: value 0x10000000000000000 does not fit in 64 bits$"),
    ("movabs rax, 0x10000000000000000\n", r"^t.asm:2: value .* does not fit in 64 bits$"),
    (".balignw 4, 0x9090\n", r"^t.asm:2: .balignw is not supported by the assembler; "
                             r"use .balign/.p2align$"),
    (".balignl 8\n", r"^t.asm:2: .balignl is not supported"),
    (".p2alignw 2\n", r"^t.asm:2: .p2alignw is not supported"),
    (".p2alignl 2\n", r"^t.asm:2: .p2alignl is not supported"),
    ("nop\n.align 8, 0x90, -1\nnop\n", r"^t.asm:3: .align: the max skip must be at least 1"),
    ("nop\n.p2align 2,0x90,0\nnop\n", r"^t.asm:3: .p2align: the max skip must be at least 1"),
    ("nop\n.align 8, 0x100\nnop\n", r"^t.asm:3: .align: the fill must be a byte value"),
])
def test_messages_name_the_line_in_one_line(body, match):
    with pytest.raises(P.PayloadError, match=match) as e:
        asm(body)
    assert "\n" not in str(e.value)


def test_a_unicode_digit_vcpus_header_is_a_payload_error_not_a_crash(tmp_path):
    # '²'.isdigit() is true but int('²') raises ValueError: a traceback, not one line
    with pytest.raises(P.PayloadError, match=r"t.asm:1: vcpus must be a positive integer"):
        asm("nop\n", header=";! vcpus: \u00b2\n")
    (tmp_path / "sup.asm").write_text(";! vcpus: \u00b2\nhlt\n")
    rows = {r[0]: r for r in P.list_payloads(str(tmp_path))}
    assert rows["sup"][1] == "?" and "bad header" in rows["sup"][4]


@pytest.mark.parametrize("body,match", [
    (".fill 1, 1, 0x1ff\n", r"^t.asm:2: .fill value 0x1ff does not fit in 1 byte"),
    (".fill 1, 4, 0x112233445\n", r"^t.asm:2: .fill value 0x112233445 does not fit in 4"),
    (".fill 2, 8, 0x1122334455667788\n", r"^t.asm:2: .fill value 0x1122334455667788 does "),
])
def test_fill_values_too_wide_are_refused_not_silently_cut(body, match):
    # keystone keeps the low bytes (at most 4) of a .fill value without a word
    with pytest.raises(P.PayloadError, match=match):
        asm(body + "nop\n")


def test_fill_values_that_fit_are_accepted():
    p = asm(".fill 2, 1, -1\n.fill 1, 2, 0xffff\n.fill 1, 4, -0x80000000\nnop\n")
    assert p.code == b"\xff\xff\xff\xff\x00\x00\x00\x80\x90"


def test_list_payloads_refuses_a_missing_or_unlistable_directory(tmp_path):
    with pytest.raises(P.PayloadError, match=r"no such directory"):
        P.list_payloads(str(tmp_path / "missing"))
    (tmp_path / "f.asm").write_text("hlt\n")
    with pytest.raises(P.PayloadError, match=r"not a directory"):
        P.list_payloads(str(tmp_path / "f.asm"))
    (tmp_path / "locked").mkdir()
    os.chmod(tmp_path / "locked", 0)
    try:
        # root reads through mode 0: a child drops CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH
        # from its effective set first (capget/capset, linux/capability.h version 3)
        proc = subprocess.run([sys.executable, "-c", _DROP_DAC_CAPS + (
            "from minivmm import payload as P\n"
            "try:\n"
            f"    P.list_payloads({str(tmp_path / 'locked' / 'sub')!r})\n"
            "except P.PayloadError as e:\n"
            "    print(e)\n")], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip().endswith("cannot list: Permission denied"), proc.stdout
    finally:
        os.chmod(tmp_path / "locked", 0o700)


_DROP_DAC_CAPS = """import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
hdr = (ctypes.c_uint32 * 2)(0x20080522, 0)
data = (ctypes.c_uint32 * 6)()
assert libc.capget(hdr, data) == 0
data[0] &= ~((1 << 1) | (1 << 2))         # effective: CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
assert libc.capset(hdr, data) == 0, os.strerror(ctypes.get_errno())
"""


def test_instructions_ending_at_an_address_are_every_decoding_that_ends_there():
    # a mov whose immediate ends in `out 0xe9, al`: both end at 0x1005 (nop; out from
    # 0x1001 does not: it is two instructions)
    found = P.instructions_ending(bytes.fromhex("bb9090e6e9"), 0x1005, "long")
    assert [(i.address, i.text) for i in found] == [(0x1003, "out 0xe9, al"),
                                                    (0x1000, "mov ebx, 0xe9e69090")]


def test_listing_lookups_by_start_end_and_inside():
    p = P.assemble_source(";! mode: long\n    mov ebx, 1\n    nop\n", "t.asm")
    mov, nop = p.listing
    assert p.instruction_at(mov.address) is mov and p.instruction_ending_at(nop.address) is mov
    assert p.instruction_containing(mov.address + 4) is mov
    assert p.instruction_containing(nop.address + 1) is None


@pytest.mark.parametrize("line", ["jmp nowhere", "mov rax, [nowhere]", ".quad nowhere",
                                  "lea rsi, [rip + nowhere + 8]"])
def test_an_undefined_symbol_is_named_on_its_own_line(line):
    # keystone says "Invalid fixup" or "Cannot find a symbol", and the line search blamed
    # the last line for a symbol used as an address or in data
    with pytest.raises(P.PayloadError) as e:
        asm(f"nop\n{line}\njmp later\nhlt\nlater: nop\n")
    assert str(e.value) == ("t.asm:3: undefined symbol 'nowhere' (no label or constant "
                            "of that name)")


@pytest.mark.parametrize("first,second,name,other", [("mov rax, [aa]", "jmp bb", "aa", "bb"),
                                                     (".quad aa", "jmp bb", "aa", "bb"),
                                                     ("mov rax, bb+1", "jmp aa", "bb", "aa")])
def test_of_two_undefined_symbols_the_first_line_is_blamed(first, second, name, other):
    # keystone asks about the second line's symbol first; its line was blamed
    with pytest.raises(P.PayloadError) as e:
        asm(f"nop\n{first}\n{second}\nhlt\n")
    assert str(e.value) == (f"t.asm:3: undefined symbol '{name}' (no label or constant of "
                            f"that name); also undefined: '{other}'")


@pytest.mark.parametrize("line,word", [
    # keystone assembles these to nothing unless first: a later line was blamed
    ("jmp $", "bare '$'"), ("mov eax, $1", "bare '$'"), (".quad $", "bare '$'"),
    ("movl $1, %eax", "'%eax' is AT&T syntax"), ("push %rax", "'%rax' is AT&T syntax"),
    # .incbin read a host file (refused only later, as 'assembler output does not match'),
    # a missing .include was skipped without a word, and a NUL cut keystone's line short
    ('.incbin "/etc/passwd"', ".incbin is not supported"),
    ('.include "missing.s"', ".include is not supported"),
    ("nop\x00", "control character '\\x00'"), ("mov al, 1\x07", "control character '\\x07'"),
    # a section switch printed LLVM's three-line diagnostic on stderr, then "the payload
    # has no instructions" (.text killed the assembler); .data was ignored without a word
    (".section .data", ".section is not supported"), (".text", ".text is not supported"),
    (".previous", ".previous is not supported"), (".data", ".data is not supported")])
def test_lines_keystone_mishandles_are_refused_where_they_are(line, word):
    with pytest.raises(P.PayloadError) as e:
        asm(f"nop\n{line}\nhlt\nnop\n")
    assert str(e.value).startswith("t.asm:3: ") and word in str(e.value)


def test_dollar_in_names_and_quotes_is_still_fine():
    p = asm("$top: nop\nmov al, '$'\njmp $top\n.ascii \"$%eax\"\n")
    assert [i.mnemonic for i in p.listing] == ["nop", "mov", "jmp"]


def test_tabs_and_crlf_line_ends_are_still_fine():
    p = asm("nop\t; a tab\r\n\tmov al, 1\r\nhlt\r\n")
    assert [i.mnemonic for i in p.listing] == ["nop", "mov", "hlt"]


@pytest.mark.parametrize("mode,header", [("long", ""), ("real", ";! mode: real\n"),
                                         ("protected", ";! mode: protected\n")])
def test_a_keystone_that_reads_decimals_as_hex_is_replaced(monkeypatch, mode, header):
    # Seen in a test run: every payload assembled after some point read `4096` as 0x4096
    # (keystone 0.9.2's radix: set to 16 by ks_option(), else as the allocation left it).
    # A sym_resolver is one way to get such a keystone.
    import keystone
    bad = keystone.Ks(keystone.KS_ARCH_X86, P._ks(mode)._mode)
    bad.sym_resolver = lambda symbol, value: False
    text, want = P._RADIX_PROBE[mode]
    assert bytes(bad.asm(text)[0]) != want                      # the condition itself
    monkeypatch.setitem(P._KS, mode, bad)
    monkeypatch.setattr(P, "_cache", {})
    reg = "ax" if mode == "real" else "eax"
    p = asm(f"mov {reg}, 4096\nmov cl, 10\n", header=header)
    assert p.code[1:3] == b"\x00\x10" and p.listing[1].raw == b"\xb1\x0a"
    assert P._KS[mode] is not bad and bad in P._KS_REJECTED


def test_a_break_at_a_label_uses_the_assembled_source_not_a_file(tmp_path, monkeypatch):
    # the labels were read again from payload.path: none for assemble_source() (or a
    # pipe, read empty the second time), and another file's where one has that name
    from minivmm.step import resolve_break
    monkeypatch.chdir(tmp_path)
    (tmp_path / "t.asm").write_text("other: nop\nnop\nnop\ntarget: hlt\n")
    p = asm("nop\ntarget:\n    inc eax\nmsg: .ascii \"ab\"\nafter: hlt\n")
    assert p.labels == {"target": 0x10001, "msg": 0x10003, "after": 0x10005}
    assert resolve_break(p, "target") == 0x10001
    assert resolve_break(p, "msg") == 0x10005          # data: the next instruction
    with pytest.raises(ValueError, match=r"labels: after, msg, target\)"):
        resolve_break(p, "other")


def test_decoding_takes_no_import_lock():
    """vCPU threads decode at every end: that must not wait on Python's import lock, which
    a Ctrl-C in the main thread can leave held for good (capstone.Cs() imported its
    optional ccapstone at every creation, reproduced: its thread then never returned)."""
    import _imp
    import threading
    done = []
    t = threading.Thread(target=lambda: done.append(
        P.disassemble_one(b"\x90", 0x1000, "long")), daemon=True)
    _imp.acquire_lock()         # as a leaked import lock would be
    try:
        t.start()
        t.join(5)
        blocked = t.is_alive()
    finally:
        _imp.release_lock()
    t.join(5)
    assert not blocked, "decoding waited on the import lock"
    assert done and done[0].mnemonic == "nop"


@pytest.mark.parametrize("line,word", [
    # refused only later, as "assembler output (7 bytes) does not match the source"
    (".rept 2", ".rept is not supported; no macros"), (".octa 1", "use two .quad"),
    (".double 1.5", "write the bits with .quad"), (".uleb128 300", ".uleb128 is not"),
    # ignored without a word: the user's intent was lost
    (".foo", ".foo is not supported; payload directives: .byte"), (".err", ".err is not"),
    ('.error "boom"', ".error is not"), (".globl g", "no symbol table"),
    (".comm sym, 4", ".comm is not"), (".eqv X, 5", "use .equ"),
    (".att_syntax", "payloads are Intel syntax"),
    (".intel_syntax prefix", ".intel_syntax prefix is not supported"),
    # a wrong listing: `.sleb128 -1` then `hlt` was listed as `jg`
    (".sleb128 -1", ".sleb128 is not"),
    # dropped the rest of the file; .stabs all of it ("the payload has no instructions")
    (".end", ".end is not supported; delete it"), ('.stabs "x",1,2,3,4', ".stabs is not"),
    # "Invalid mnemonic"
    ('.asciiz "hi"', ".asciiz is not supported; use .asciz"),
    # keystone looped until the 5 s watchdog; LLVM aborted the child with stderr noise
    (".tfloat 1.0", ".tfloat is not"), (".zero -1", ".zero -1: the size must be 0 to"),
    (".cfi_startproc", ".cfi_startproc is not"),
    # encoded for another mode: the listing blamed a later line
    (".code32", ".code32 in a long-mode payload: the header sets the mode"),
    (".code16", "`;! mode: real`"),
    # glued to the next line's bytes: the listing blamed a later line
    ("rep", "prefix 'rep' alone on a line"), ("lock", "prefix 'lock' alone"),
    ("data16", "prefix 'data16' alone"),
    # a traceback from the listing; a fill byte cut to its low byte; a 5 s timeout
    (".space -1", ".space -1: the size"),
    (".skip 2, 0x1ff", ".skip: the fill must be a byte value"),
    (".space 100000000", ".space 100000000: the size must be 0 to 0x10000 bytes"),
    (".fill 2, 0, 1", "a size of 1 to 8"), (".fill 100000000, 1, 0", "a count of 0 to"),
    (".fill -1, 1, 0", "a count of 0 to"),
    # defined nothing without a word; a traceback (IndexError) reading the constants
    (".equ X", "expected `.equ NAME, VALUE`"), (".set X, 1 +", "incomplete operand")])
def test_unsupported_directives_are_refused_on_their_line(line, word):
    t0 = time.monotonic()
    with pytest.raises(P.PayloadError) as e:
        asm(f"nop\n{line}\nhlt\nnop\n")
    assert str(e.value).startswith("t.asm:3: ") and word in str(e.value), str(e.value)
    assert "\n" not in str(e.value) and time.monotonic() - t0 < 3


@pytest.mark.parametrize("mode,body,code", [
    ("long", ".skip 4\nnop\n", "0000000090"),           # was "does not match the source"
    ("long", ".skip 2, 0x90\n.space 1, -1\n", "9090ff"),
    ("real", ".code16\nmov ax, 1\n", "b80100"),           # what the header says: fine
    ("protected", ".code32\nmov ax, 1\n", "66b80100"),
    ("long", ".intel_syntax noprefix\n.code64\nmov eax, 1\n", "b801000000"),
    ("long", "rep movsb\nlock add [rax], eax\nrepne scasb\n", "f3a4f00100f2ae"),
])
def test_supported_directives_and_prefixes_assemble(mode, body, code):
    p = asm(body, header=f";! mode: {mode}\n")
    assert p.code.hex() == code
    assert sum(i.size for i in p.listing) <= len(p.code)


@pytest.mark.parametrize("body,code", [
    # a size of 0 is GAS's no bytes: `.zero 0` assembled before the size check refused it,
    # `.space 0` was a traceback from the listing
    (".zero 0\nhlt\n", "f4"), (".skip 0\nhlt\n", "f4"), ("nop\n.space 0\nhlt\n", "90f4"),
    (".equ PAD, 0\n.zero PAD\nhlt\n", "f4"),
    # a constant size with a fill: keystone, sizing the line alone, looped for ever (no
    # watchdog there)
    (".equ P, 2\n.space P, 0x90\nhlt\n", "9090f4"), (".set N, 2\n.fill N, 2, 1\nhlt\n",
                                                    "01000100f4"),
    # a label not peeled: `.lloop: is not supported`
    ("start: .Lloop: nop\njmp .Lloop\n", "90ebfd"),
])
def test_legal_gas_that_keystone_handles_assembles(body, code):
    t0 = time.monotonic()
    assert asm(body).code.hex() == code
    assert time.monotonic() - t0 < 3


def test_a_size_from_labels_is_refused_not_assembled_to_nothing():
    # keystone emitted no bytes for it (GAS: 15), and the listing did not notice
    with pytest.raises(P.PayloadError, match="t.asm:4: .space 16 - .*a number or a constant"):
        asm("start: hlt\nend_:\n.space 16 - (end_ - start)\n")


@pytest.mark.parametrize("mode,body,line,match", [
    # a reference to a label further down failed its prefix as "Invalid fixup": line 2
    # was blamed for the error on line 4
    ("real", "mov si, msg\nhlt\nfoo bar\nmsg: .byte 1\n", 4, "Invalid mnemonic"),
    ("long", "lea rsi, [rip + msg]\nhlt\nfoo bar\nmsg: .byte 1\n", 4, "Invalid mnemonic"),
    # a fixup that really fails, after a forward jump: its own line, not the jump's
    ("long", "jmp later\nmov al, msg\nlater: nop\nmsg: nop\n", 3, "Invalid fixup"),
])
def test_the_failing_line_is_blamed_past_forward_references(mode, body, line, match):
    with pytest.raises(P.PayloadError) as e:
        asm(body, header=f";! mode: {mode}\n")
    assert str(e.value) == f"t.asm:{line}: {match}"


def test_the_tutorial_lists_exactly_the_supported_directives():
    from tests.conftest import ROOT
    text = (ROOT / "docs" / "tutorial.md").read_text()
    m = re.search(r"assembler directives, and no others:\n`([^`]*)`", text)
    assert m and set(m.group(1).split()) == set(P._SUPPORTED_DIRECTIVES)


def test_equiv_does_not_redefine():
    # keystone kept the first value; the value check then said line 6's `mov bl, X`
    # "does not fit in the operand (assembled as 0x1)"
    with pytest.raises(P.PayloadError) as e:
        asm("nop\n.equiv X, 1\nmov al, X\n.equiv X, 2\nmov bl, X\n")
    assert str(e.value) == ("t.asm:5: .equiv X: already defined on line 3 (.equiv never "
                            "redefines; use .set)")
    assert asm(".equiv X, 1\n.set Y, 2\n.set Y, 3\nmov al, X\nmov bl, Y\n").code.hex() \
        == "b001b303"


def test_the_listing_is_made_under_the_watchdog_too():
    # The listing asks keystone again, line by line, and keystone can loop on a line the
    # whole source assembled (`.space P, 0x90` alone, P unknown there): that ran in this
    # process, with no watchdog. Here the constant sizing that avoids it is turned off;
    # in a process of its own, so that a hang fails the test instead of stopping it.
    code = ("from minivmm import payload as P\n"
            "P.ASSEMBLE_TIMEOUT_S = 1.0\n"
            "P._sized = lambda *a: None\n"
            "try:\n"
            "    P.assemble_source(';! mode: long\\nnop\\n.equ P, 1\\n.space P, 0x90\\n"
            "hlt\\n', 't.asm')\n"
            "except P.PayloadError as e:\n"
            "    print(e)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=30)
    assert "t.asm: the assembler did not finish within 1 s" in proc.stdout, proc.stderr


def test_the_watchdog_gives_a_long_listing_its_time(monkeypatch):
    # the listing moved under the assembler's watchdog: 32000 jmps (64 KB, within
    # CODE_MAX) took 4-6 s there and were refused as a looping keystone after 5 s
    monkeypatch.setattr(P, "ASSEMBLE_TIMEOUT_S", 0.2)
    body = "".join(f"l{i}: jmp l{i + 1}\n" for i in range(4000)) + "l4000: hlt\n"
    p = asm(body)
    assert len(p.code) == 8001 and len(p.listing) == 4001


def test_a_bug_in_the_listing_is_shown_as_one(monkeypatch):
    def broken(*a):
        raise ZeroDivisionError("a bug of ours")
    monkeypatch.setattr(P, "_listing", broken)
    with pytest.raises(RuntimeError, match="(?s)listing t.asm failed.*ZeroDivisionError: a bug"):
        asm("nop\nnop\nnop\nhlt\n")


@pytest.mark.parametrize("line,message", [
    # GAS refuses it, keystone takes it; the message named `.ascii"ab"` as a directive
    ('.ascii"ab"', '.ascii needs a space before its operands (write `.ascii "ab"`)'),
    (".byte(1)", ".byte needs a space before its operands (write `.byte (1)`)"),
    ('.foo"x"', ".foo is not supported; payload directives: .byte"),
])
def test_a_directive_glued_to_its_operands_is_named_as_itself(line, message):
    with pytest.raises(P.PayloadError) as e:
        asm(f"nop\n{line}\nhlt\n")
    assert str(e.value).startswith(f"t.asm:3: {message}"), str(e.value)


@pytest.mark.parametrize("line", [
    # keystone looped until the 5 s watchdog, which named no line
    ".space 2*P, 0x90", ".fill P, 1, 0x90",
    # keystone emitted nothing: "t.asm:5: ... does not decode as an instruction for 'hlt'"
    ".space P", ".zero P", ".balign P", ".fill 2, P", ".fill 2, 1, P", ".space 2, P",
])
def test_a_size_or_fill_from_a_later_constant_is_refused_on_its_line(line):
    t0 = time.monotonic()
    with pytest.raises(P.PayloadError) as e:
        asm(f"nop\n{line}\n.equ P, 4\nhlt\n")
    assert str(e.value).startswith(f"t.asm:3: {line.split()[0]}: P is defined on line 4, "
                                   "after this line: define it first"), str(e.value)
    assert time.monotonic() - t0 < 3
    # defined first, it assembles
    assert asm(f"nop\n.equ P, 4\n{line}\nhlt\n").code


@pytest.mark.parametrize("line,what", [
    # keystone looped until the watchdog (no line named)
    (".space L, 0x90", "'L' must be a number or a constant of known value"),
    (".fill L, 1, 0x90", "'L' must be a number or a constant"),
    (".space X, 0x90", "'X' must be a number or a constant"),
    (".space Q, 0x90", "'Q' must be a number or a constant"),
    (".space 08, 0x90", "'08' is not a value the assembler can size or fill from"),
    (".space 'ab', 0x90", "\"'ab'\" is not a value"),
    # keystone emitted nothing, and a later line was blamed
    (".space 2, L", "'L' must be a number"), (".fill 2, 1, X", "'X' must be a number"),
])
def test_a_size_or_fill_that_is_no_known_value_is_refused_on_its_line(line, what):
    t0 = time.monotonic()
    with pytest.raises(P.PayloadError) as e:
        asm(f"a: nop\nb: nop\n.equ Q, b - a\n{line}\nL: hlt\n")
    assert str(e.value).startswith(f"t.asm:5: {line}: {what}"), str(e.value)
    assert "\n" not in str(e.value) and time.monotonic() - t0 < 3


def test_a_constant_from_a_later_one_has_its_value():
    # keystone (and GAS) resolve Q at the end; it was unknown here, and `.space Q`
    # was refused as sized "from labels"
    p = asm("nop\n.set Q, P + 1\n.equ P, 4\n.space Q, 0x90\nmov al, Q\n")
    assert p.code.hex() == "90" + "90" * 5 + "b005"


@pytest.mark.parametrize("body,code", [
    # the `;` after an escaped quote was taken for a comment: keystone, given the cut
    # string, looped until the watchdog (no line named)
    ('.ascii "a\\";b"\n', '61223b62'),
    ('.ascii "q\\" ; x" ; a comment\n', '7122203b2078'),
    # `[` in a string after an escaped quote: "unbalanced brackets"
    ('.ascii "\\"[", "x"\n', '225b78'),
    ('.ascii "a\\\\"\nnop\n', '615c90'),
])
def test_an_escaped_quote_keeps_the_string_open(body, code):
    assert asm(body).code.hex() == code


def test_an_unterminated_string_is_refused_on_its_line():
    # keystone looped until the 5 s watchdog, which named no line
    t0 = time.monotonic()
    for line in ('.ascii "ab', '.asciz "ab\\"'):
        with pytest.raises(P.PayloadError) as e:
            asm(f"nop\n{line}\nhlt\n")
        assert str(e.value).startswith("t.asm:3: unterminated string in "), str(e.value)
    assert time.monotonic() - t0 < 3


def test_an_assembler_the_host_cannot_fork_is_a_clear_error_and_leaks_no_pipe(monkeypatch,
                                                                              tmp_path, capsys):
    # os.fork() refused (RLIMIT_NPROC, as a non-root user under `prlimit --nproc=1`): a
    # BlockingIOError traceback, and the two ends of the pipe to the child were left open
    from minivmm import cli

    def refused():
        raise BlockingIOError(errno.EAGAIN, os.strerror(errno.EAGAIN))
    monkeypatch.setattr(os, "fork", refused)
    fds = len(os.listdir("/proc/self/fd"))
    with pytest.raises(OSError) as e:
        asm("mov eax, 12345\nhlt\n")        # a source no earlier test put in the cache
    assert e.value.errno == errno.EAGAIN
    assert "t.asm: cannot fork the assembler's process" in str(e.value)
    assert "RLIMIT_NPROC" in str(e.value)
    assert len(os.listdir("/proc/self/fd")) == fds
    src = tmp_path / "fresh.asm"
    src.write_text(";! mode: long\nmov eax, 54321\nhlt\n")
    assert cli.main(["disasm", str(src)]) == 1
    out = capsys.readouterr()
    line, = out.err.strip().splitlines()
    assert line.startswith(f"minivmm: {src}: cannot fork the assembler's process: "), line
    assert out.out == ""


@pytest.mark.parametrize("text", [
    # int(text, 0) took each: octal, binary, underscores, other scripts' digits
    "0o200000", "0b10000000000000000", "6_5536", "0x1_0000", "\u0666\u0665\u0665\u0663\u0666",
])
def test_a_break_address_is_decimal_or_hex_as_the_cli_counts_are(text):
    from minivmm.step import resolve_break
    p = asm("nop\nnop\n")
    assert resolve_break(p, "0x10000") == resolve_break(p, "65536") == 0x10000
    assert resolve_break(p, "0X10001") == 0x10001
    with pytest.raises(ValueError, match=r": not a number \(decimal, or hex after 0x\), "
                                         r"line:N, or a label of"):
        resolve_break(p, text)


@pytest.mark.parametrize("text", ["line:\u0661\u0662", "line:+1", "line:1_0", "line: 1",
                                  "line:0x1"])
def test_a_break_line_is_ascii_decimal(text):
    from minivmm.step import resolve_break
    p = asm("nop\nnop\n")
    assert resolve_break(p, "line:2") == 0x10000     # line 1 is the header
    with pytest.raises(ValueError, match=r"expected line:N with N a line number \(decimal\)$"):
        resolve_break(p, text)


@pytest.mark.parametrize("text", ["9" * 5000, "0x" + "f" * 5000, "line:" + "1" * 5000,
                                  "L" * 5000])
def test_a_huge_break_is_named_in_a_short_message(text):
    # a 5000-digit value was echoed whole, twice for a hex one (the text and the address)
    from minivmm.step import resolve_break
    with pytest.raises(ValueError) as info:
        resolve_break(asm("nop\n"), text)
    assert len(str(info.value)) < 300, str(info.value)[:200]


def test_a_break_address_with_a_leading_zero_is_not_called_a_label():
    from minivmm.step import resolve_break
    with pytest.raises(ValueError, match=r"^breakpoint 065536: not an address: decimal "
                                         r"without a leading 0, or hex after 0x$"):
        resolve_break(asm("nop\n"), "065536")


@pytest.mark.parametrize("line,code", [
    # keystone reads a backslash-escaped character as one byte; _known refused these as
    # "not a value the assembler can size or fill from" (they assembled before it)
    (".space 2, '\\n'", "0a0a"), (".space 2, '\\t'", "0909"), (".space 2, '\\''", "2727"),
    (".space 2, '\\\\'", "5c5c"), (".fill 2, 2, '\\n' + 1", "0b000b00"),
])
def test_a_fill_of_an_escaped_character_assembles(line, code):
    assert asm(f"{line}\nhlt\n").code.hex() == code + "f4"


@pytest.mark.parametrize("body,code", [
    # a backslash escapes the quote of a 'c' character too (keystone reads '\'' as 0x27):
    # the quote after it opened a string, the comment was kept, "Invalid mnemonic"
    ("mov al, '\\'' ; a comment\n", "b027"), (".byte '\\'', 1 ; c\n", "2701"),
    ("mov al, '\\\\' ; c\n", "b05c"),
])
def test_an_escaped_quote_in_a_character_ends_no_comment(body, code):
    assert asm(body + "hlt\n").code.hex() == code + "f4"


@pytest.mark.parametrize("body", ["mov al, '\\0'", ".space 2, '\\0'", ".fill 1, 1, '\\r'",
                                  ".byte '\\e'", "x = '\\x'\nmov al, x"])
def test_an_escape_keystone_reads_as_its_letter_is_refused(body):
    # '\0' assembled as 0x30 ('0') and '\r' as 0x72 ('r'), without a word: LLVM's lexer
    # knows only \n, \t and \b in a character
    with pytest.raises(P.PayloadError, match=r"is read by the assembler as '.' \(0x"):
        asm(body + "\nhlt\n")


def test_an_escape_in_a_string_is_no_character():
    # in a "string" keystone reads the escapes as GAS does ("\0" is a zero byte)
    assert asm(".ascii \"'\\0'\"\n.byte '\\n', '\\t', '\\b'\nhlt\n").code.hex() == \
        "270027" + "0a0908" + "f4"


def test_threads_assembling_at_once_never_share_keystone(monkeypatch):
    # keystone is not thread-safe and its asm() runs without the GIL: 8 threads each
    # assembling a payload of their own corrupted its heap (a segfault, every run)
    import threading
    monkeypatch.setattr(P, "_cache", {})
    real, active, most = P.keystone.Ks.asm, [0], [0]
    safe = threading.Lock()     # the test's own: an overlap is counted, never run (a crash)

    def asm_alone(self, *args, **kwargs):
        active[0] += 1
        most[0] = max(most[0], active[0])
        time.sleep(0.005)               # lets another thread in, if nothing keeps it out
        try:
            with safe:
                return real(self, *args, **kwargs)
        finally:
            active[0] -= 1
    monkeypatch.setattr(P.keystone.Ks, "asm", asm_alone)
    codes, errors = {}, []

    def one(i):
        try:
            # a mask: each needs _keystone_value's check of its value, in this process
            codes[i] = asm(f"mov eax, {i} & 0xff\nout 0xf4, al").code
        except Exception as e:      # noqa: BLE001
            errors.append(repr(e))
    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == [] and most[0] == 1
    assert all(codes[i] == bytes((0xB8, i, 0, 0, 0, 0xE6, 0xF4)) for i in range(8))


def test_a_fork_while_another_thread_holds_keystone_leaves_the_child_one(monkeypatch):
    # The program's own fork (multiprocessing) while another thread was assembling: the
    # child, which has no such thread, found _KS_LOCK held and waited at its first payload
    # for ever. The fork waits for keystone to be idle instead
    import threading
    monkeypatch.setattr(P, "_cache", {})
    held, release = threading.Event(), threading.Event()

    def holder():
        with P._KS_LOCK:
            held.set()
            release.wait(10)
    t = threading.Thread(target=holder)
    t.start()
    assert held.wait(10)
    threading.Timer(0.2, release.set).start()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            signal.alarm(5)         # the test's own limit on a hang
            code = 0 if asm("mov eax, 7\nhlt\n").code == bytes.fromhex("b807000000f4") else 2
        finally:
            os._exit(code)
    release.set()
    t.join(10)
    status = os.waitpid(pid, 0)[1]
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, \
        f"the child {'hung (SIGALRM)' if os.WIFSIGNALED(status) else 'failed'}: {status}"
