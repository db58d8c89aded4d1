"""The guest conventions a payload relies on (README, "Guest conventions"): the entry state
in every mode, and how deep a stack may go before it overwrites something else."""
import re

import pytest

from minivmm import Machine, MachineError
from minivmm.payload import assemble_source
from minivmm.step import StepSession
from minivmm.x86 import layout as L
from tests.conftest import ROOT, run_cli

# Each vCPU prints its entry registers, one hex number a line, and exits 0.
_HEX = {"long": "rbx", "protected": "ebx", "real": "bx"}
_REPORT = {
    "long": ("rdi", "rsi", "rdx", "rcx", "rsp"),
    "protected": ("edi", "esi", "edx", "ecx", "esp"),
    "real": ("di", "sp", "ss", "cs", "ds", "es"),
}


def _report_source(mode: str, cpl: int = 3) -> str:
    regs = _REPORT[mode]
    lines = [f";! mode: {mode}"] + ([f";! cpl: {cpl}"] if mode == "long" else [])
    bx, digits = _HEX[mode], {"long": 16, "protected": 8, "real": 4}[mode]
    cx = {"long": "rcx", "protected": "ecx", "real": "cx"}[mode]
    # the stack pointer first, before any push moves it; segments go through AX
    acc = {"long": "rax", "protected": "eax", "real": "ax"}[mode]
    for reg in regs:
        if reg in ("ss", "cs", "ds", "es"):
            lines += [f"    mov ax, {reg}", f"    movzx {bx}, ax" if mode != "real"
                      else "    mov bx, ax", "    call hex"]
        else:
            lines += [f"    mov {bx}, {reg}", f"    push {acc}", f"    push {cx}",
                      "    call hex", f"    pop {cx}", f"    pop {acc}"]
    lines += ["    xor al, al", "    out 0xf4, al",
              "hex:", f"    mov {cx}, {digits}",
              "hl:", f"    rol {bx}, 4", "    mov al, bl", "    and al, 0xf", "    cmp al, 10",
              "    jb dig", "    add al, 39",
              "dig:", "    add al, 48", "    out 0xe9, al", f"    dec {cx}", "    jnz hl",
              "    mov al, 10", "    out 0xe9, al", "    ret"]
    return "\n".join(lines)


@pytest.mark.parametrize("mode,cpl,vcpus,pages", [
    ("long", 3, 3, 7), ("long", 0, 2, 64), ("protected", 0, 2, 5), ("real", 0, 3, 64)])
def test_entry_state_is_the_readmes(mode, cpl, vcpus, pages):
    """RDI = index, RSI/RDX = this vCPU's share (pages // vCPUs, the rest no vCPU's),
    RCX = 0 iterations under a plain run, RSP = the top of its block; real mode: DI =
    index, SS:SP = its block, CS = DS = ES = 0x1000."""
    p = assemble_source(_report_source(mode, cpl), name=f"entry-{mode}")
    with Machine(p, vcpus=vcpus, pages=pages) as m:
        result = m.run(timeout=60)
    share = pages // vcpus
    for st in result.vcpus:
        assert st.end.reason == "exit-port" and st.end.code == 0, st.end.summary()
        got = dict(zip(_REPORT[mode], (int(x, 16) for x in st.console.decode().split())))
        i, block = st.index, L.vcpu_block(st.index)
        if mode == "real":
            assert got == {"di": i, "sp": L.USER_STACK_TOP_OFF, "ss": block >> 4,
                           "cs": L.CODE >> 4, "ds": L.CODE >> 4, "es": L.CODE >> 4}
        else:
            assert list(got.values()) == [i, L.DATA_GPA + i * share * L.PAGE, share, 0,
                                          block + L.USER_STACK_TOP_OFF]


def test_readme_states_the_cpl3_stack_depth():
    """How deep a CPL3 payload's stack may go is part of its contract: nothing guards the
    end (2 MiB pages), and below it lie the exception stack and the TSS. The README said
    only "own stack", and a payload that used 9 KiB passed `minivmm run` but failed under
    `minivmm step`, whose #DB frames landed on its stack."""
    text = " ".join((ROOT / "README.md").read_text().split())
    said = re.search(r"At CPL3 the own stack is \*\*(\d+) KiB\*\* \(block \+ (0x[0-9a-f]+) "
                     r"to \+ (0x[0-9a-f]+)\)", text)
    assert said, "the README does not say how deep a CPL3 payload's stack may go"
    kib, low, top = int(said.group(1)), int(said.group(2), 16), int(said.group(3), 16)
    assert (low, top) == (L.EXC_STACK_TOP_OFF, L.USER_STACK_TOP_OFF)
    assert kib * 1024 == top - low
    assert re.search(rf"RSP0, block \+ {L.EXC_STACK_TOP_OFF:#x}", text)


def _stack_user(nbytes: int) -> str:
    """Fills nbytes of stack with 1, 2, ... and checks them on the way back: exit 0, or 1
    when one was overwritten."""
    n = nbytes // 8
    return f"""\
    mov rcx, {n}
fill:
    push rcx
    dec rcx
    jnz fill
    mov rcx, 1
check:
    pop rax
    cmp rax, rcx
    jne bad
    inc rcx
    cmp rcx, {n + 1}
    jne check
    xor eax, eax
    out 0xf4, al
bad:
    mov al, 1
    out 0xf4, al
"""


@pytest.mark.parametrize("nbytes,intact", [(8192, True), (8192 + 64, False)])
def test_cpl3_stack_depth_is_what_the_readme_says(nbytes, intact):
    """8 KiB of stack are the payload's even under in-guest stepping; past them the #DB
    frames at RSP0 overwrite it, as the README warns."""
    p = assemble_source(_stack_user(nbytes), name="stack-depth")
    with StepSession(p, mechanism="in-guest", max_time=60) as s:
        for _ in s:
            pass
        assert s.end is not None and s.end.reason == "exit-port"
        assert (s.end.code == 0) is intact


def test_protected_mode_data_slot_ends_at_4_gib():
    """Protected mode's ESI is 32 bits: with a data slot past 4 GiB, vCPU 1's share base
    (1 GiB + 4 GiB) reached it as 1 GiB, vCPU 0's share, and both "exited with code 0"
    having written the same page. Refused now, in one line naming --pages; the largest
    slot it can reach still runs, each vCPU on its own share."""
    src = ";! mode: protected\nmov dword ptr [esi], edi\ninc dword ptr [esi]\n" \
          "xor eax, eax\nout 0xf4, al\n"
    p = assemble_source(src, name="pm-share")
    most = L.PROTECTED_MAX_DATA_PAGES
    assert most == 786432 and f"at most {most} pages (3 GiB)" in \
        " ".join((ROOT / "README.md").read_text().split())
    with pytest.raises(MachineError, match=rf"pages {2 * 0x100000} .* at most {most} pages"):
        Machine(p, vcpus=2, pages=2 * 0x100000)
    with Machine(p, vcpus=2, pages=most) as m:
        assert m.run(timeout=60).ok
        for i in range(2):
            at = L.DATA_GPA + i * (most // 2) * L.PAGE
            assert m.data.read(at, 4) == (i + 1).to_bytes(4, "little")


def test_cli_refuses_a_protected_data_slot_past_4_gib():
    r = run_cli("run", "hello_protected", "--pages", str(L.PROTECTED_MAX_DATA_PAGES + 1))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.count("\n") == 1 and "--pages" in r.stderr and "4 GiB" in r.stderr
