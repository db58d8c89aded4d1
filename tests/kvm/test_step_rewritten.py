"""Code whose instructions are not the listing's: the guest rewrites it with other
boundaries, jumps into the middle of a listed instruction, runs code it wrote into the
data slot, or an instruction writes over itself. `minivmm step`, `run --trace` and the
vCPU's end must each name the instruction the CPU ran, with a source line only where
memory still holds the listed bytes."""
import io

import pytest

from minivmm.cli import _trace_printer
from minivmm.machine import Machine
from minivmm.payload import assemble_source
from minivmm.step import StepSession

# 3-byte `add`s become nop; out 0xe9, al | nop; nop; int3: the out ends inside the
# first add, the int3 ends where the second ends
REWRITE = """;! mode: long
    lea rdi, [rip + patch]
    mov dword ptr [rdi], 0x90e9e690
    mov word ptr [rdi+4], 0xcc90
    mov al, 0x41
patch:
    add rax, rbx
    add rax, rcx
"""

# each jump lands one byte into a mov whose immediate is code ending where the mov ends
MIDDLE = """;! mode: long
    mov al, 0x42
    lea rdx, [rip + hidden + 1]
    jmp rdx
hidden:
    mov ebx, 0xe9e69090
    lea rdx, [rip + trap + 1]
    jmp rdx
trap:
    mov ecx, 0xcc909090
"""

# mov al, 0x43; out 0xe9, al; nop; int3 written to the data slot, then called
DATA = """;! mode: long
    mov dword ptr [rsi], 0xe9e643b0
    mov dword ptr [rsi+4], 0x9090cc90
    call rsi
"""

# its own displacement (-4) becomes 0x90909090 as it runs
SELF = """;! mode: long
    mov eax, 0x90909090
    mov dword ptr [rip - 4], eax
    xor eax, eax
    out 0xf4, al
"""

# real mode: a rewrite, then a far jump to the same linear code in another segment and
# one byte into a mov whose immediate is an out
REAL = """;! mode: real
    mov dword ptr [patch], 0x90e9e690
    mov al, 0x52
patch:
    add ax, bx
    add ax, cx
    .byte 0xea
    .word 0x5000 + there + 1
    .word 0x0b00
there:
    mov bx, 0xe9e6
    hlt
"""


def run_traced(src):
    """(trace lines' instruction names, the vCPU's end) of a `minivmm run --trace`."""
    out = io.StringIO()
    with Machine(assemble_source(src, "t.asm")) as m:
        m.trace = _trace_printer(m, out)
        end = m.run(timeout=20).vcpus[0].end
    names = [line.split("  by ", 1)[1] for line in out.getvalue().splitlines()]
    return names, end


def stepped(src):
    with StepSession(assemble_source(src, "t.asm")) as s:
        steps = list(s.run())
        return [(st.instruction, st.line) for st in steps], s.end


@pytest.mark.parametrize("src,out,int3", [
    (REWRITE, "out 0xe9, al  ; rewritten by the guest (line 7: add rax, rbx)",
     "int3  ; rewritten by the guest (line 8: add rax, rcx)"),
    (MIDDLE, "out 0xe9, al  ; run from byte 3 of line 6 (mov ebx, 0xe9e69090)",
     "int3  ; run from byte 4 of line 10 (mov ecx, 0xcc909090)"),
    (DATA, "out 0xe9, al", "int3"),
], ids=["rewrite", "middle", "data"])
def test_trace_and_exception_name_the_instruction_that_ran(src, out, int3):
    # before: "?" or the listed mov (with its line) for the out; none or the mov for int3
    names, end = run_traced(src)
    assert names[0] == out
    assert end.reason == "exception" and end.vector == 3
    assert end.instruction == int3
    assert end.summary().endswith(f"({int3})")


def test_steps_of_rewritten_and_generated_code_have_no_source_line():
    got, end = stepped(REWRITE)
    assert got[4:] == [("nop", 0), ("out 0xe9, al", 0), ("nop", 0), ("nop", 0)]
    assert end.instruction == "int3  ; rewritten by the guest (line 8: add rax, rcx)"
    got, end = stepped(MIDDLE)
    assert got[3:6] == [("nop", 0), ("nop", 0), ("out 0xe9, al", 0)]
    assert end.instruction == "int3  ; run from byte 4 of line 10 (mov ecx, 0xcc909090)"
    got, end = stepped(DATA)
    assert got[3:] == [("mov al, 0x43", 0), ("out 0xe9, al", 0), ("nop", 0)]
    assert end.instruction == "int3"


def test_an_instruction_that_writes_over_itself_is_stepped_as_it_ran():
    # before: its bytes were read after it ran, giving `mov dword ptr [rip - 0x6f6f6f70],
    # eax` and no line
    got, end = stepped(SELF)
    assert got[1] == ("mov dword ptr [rip - 4], eax", 3)
    assert end.reason == "exit-port" and end.instruction == "out 0xf4, al  ; line 5"


def test_real_mode_rewrites_and_far_jumps_are_named_as_they_ran():
    # before: every trace line said "by ?", and the step of the far jump read its bytes
    # in the segment it jumped to ("add byte ptr [bx + si], al")
    names, end = run_traced(REAL)
    assert names == ["out 0xe9, al  ; rewritten by the guest (line 5: add ax, bx)",
                     "out 0xe9, al  ; run from byte 1 of line 11 (mov bx, 0xe9e6)",
                     "hlt  ; line 12"]
    assert end.reason == "hlt" and end.instruction == "hlt  ; line 12"
    got, end = stepped(REAL)
    assert got[2:] == [("nop", 0), ("out 0xe9, al", 0), ("nop", 0),
                       ("ljmp 0xb00:0x5018", 0), ("out 0xe9, al", 0), ("hlt", 12)]
    assert end.reason == "hlt" and end.instruction == "hlt  ; line 12"


@pytest.mark.parametrize("src,reason,named", [
    (";! mode: long\n    mov dword ptr [rsi], 0xf4e609b0\n    jmp rsi\n",
     "exit-port", "out 0xf4, al"),
    (";! mode: long\n;! cpl: 0\n    lea rdx, [rip + here + 2]\n    jmp rdx\nhere:\n"
     "    mov ebx, 0xf4909090\n", "hlt", "hlt  ; run from byte 4 of line 6 (mov ebx, 0xf4909090)"),
    (";! mode: long\n    mov rdi, 0xd0000000\n    mov dword ptr [rsi], 0x0107c6\n"
     "    jmp rsi\n", "unhandled-mmio", "mov byte ptr [rdi], 1"),
], ids=["exit-port", "hlt", "mmio-write"])
def test_ends_past_code_not_in_the_listing_name_it(src, reason, named):
    # RIP is past the instruction: the one ending there is what the exit proves it was
    # (before: none named, or the listed mov)
    _, end = run_traced(src)
    assert end.reason == reason and end.instruction == named


def test_real_mode_int3_inside_an_instruction_in_another_segment():
    # before: the mov it hides in was named, with its line
    src = (";! mode: real\n    .byte 0xea\n    .word 0x5000 + there + 2\n    .word 0x0b00\n"
           "there:\n    mov bx, 0xcc90\n    hlt\n")
    _, end = run_traced(src)
    assert end.vector == 3 and end.rip == 0x5008
    assert end.instruction == "int3  ; run from byte 2 of line 6 (mov bx, 0xcc90)"
