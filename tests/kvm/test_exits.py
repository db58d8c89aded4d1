"""How a vCPU's exits end it, as KVM really makes them: the exit named, the instruction
that made it, and the slot for an MMIO exit inside RAM."""
import pytest

from minivmm import Kvm, abi
from minivmm.machine import Machine
from minivmm.payload import assemble_source


def _end(src, name="t.asm", **kw):
    with Machine(assemble_source(src, name), **kw) as m:
        return m.run(timeout=20).vcpus[0].end


@pytest.mark.parametrize("mode,body,ins", [
    ("long", "    mov rsp, 0xd0001000\n    mov rax, 0x1122334455667788\n    push rax\n",
     "push rax"),
    ("long", "    mov rsp, 0xd0001000\n    pushfq\n", "pushfq"),
    ("protected", "    mov esp, 0xd0001000\n    push 0x11223344\n", "push 0x11223344"),
    # RIP is the call's target: here the next instruction, so the call ends at it
    ("long", "    mov rsp, 0xd0001000\n    call next\nnext:\n", "call"),
])
def test_a_stack_write_into_a_hole_names_the_pushing_instruction(mode, body, ins):
    # a push names no memory operand: it went unnamed, and a `call` was passed over for
    # "add byte ptr [rax], al  ; run from byte 3 of line 4 (call ...)", which never ran
    end = _end(f";! mode: {mode}\n{body}    xor eax, eax\n    out 0xf4, al\n")
    assert end.reason == "unhandled-mmio" and end.detail["is_write"]
    assert end.instruction is not None and end.instruction.startswith(ins), end.instruction
    assert "run from" not in end.instruction


def test_a_write_to_a_read_only_slot_says_so():
    with Kvm() as kvm:
        if not kvm.check_extension(abi.KVM_CAP_READONLY_MEM):
            pytest.skip("KVM_CAP_READONLY_MEM not offered")
    src = (";! mode: long\n    mov rax, 0x8877665544332211\n    mov qword ptr [rsi], rax\n"
           "    xor eax, eax\n    out 0xf4, al\n")
    end = _end(src, data_flags=abi.KVM_MEM_READONLY)
    assert end.reason == "unhandled-mmio"
    assert end.detail["phys_addr"] == 0x40000000 and end.detail["len"] == 8
    assert end.detail["data"] == 0x8877665544332211
    assert end.detail["slot"] == 1 and end.detail["read_only"] is True
    assert "outside RAM" not in end.summary()
    assert end.summary().startswith('write to read-only memory (slot 1 "data"')
    # a hole is still outside RAM
    hole = _end(";! mode: long\n    mov rdi, 0xd0000000\n    mov byte ptr [rdi], 1\n")
    assert "slot" not in hole.detail
    assert hole.summary().startswith("access outside RAM (MMIO): write of 1 byte(s)")


def test_an_unexpected_exit_is_named_with_its_number():
    # request_interrupt_window with IF set and no in-kernel irqchip: KVM_EXIT_IRQ_WINDOW_OPEN
    # (api.rst, "request_interrupt_window"), an exit minivmm does not handle
    def on_vcpu(machine, st):
        st.vcpu.run_struct.request_interrupt_window = 1
    src = ";! mode: long\n;! cpl: 0\n    sti\nhere:\n    nop\n    jmp here\n"
    end = _end(src, on_vcpu=on_vcpu)
    assert end.reason == "unexpected-exit"
    assert end.detail["exit"] == "KVM_EXIT_IRQ_WINDOW_OPEN (7)"
    assert "KVM_EXIT_IRQ_WINDOW_OPEN (7)" in end.summary()
    assert "registers" in end.detail


@pytest.mark.parametrize("mode,sp,before_target", [
    ("long", "rsp", "push rax"), ("long", "rsp", "mov byte ptr [rbx], al"),
    ("protected", "esp", "push eax"),
])
def test_a_call_into_a_hole_is_named_not_the_instruction_before_its_target(
        mode, sp, before_target):
    # RIP is the call's target: the push (or store) that ends there never ran, and was
    # named as the writer; the return address written says which call it was
    src = (f";! mode: {mode}\n    mov {sp}, 0xd0001000\n    call target\n"
           f"    {before_target}\ntarget:\n    xor eax, eax\n    out 0xf4, al\n")
    end = _end(src)
    assert end.reason == "unhandled-mmio" and end.detail["is_write"]
    assert end.instruction is not None and end.instruction.startswith("call "), end.instruction
    assert "line 3" in end.instruction, end.instruction


def test_the_run_trace_names_the_call_too(tmp_path):
    import subprocess
    import sys
    path = tmp_path / "call.asm"
    path.write_text(";! mode: long\n    mov rsp, 0xd0001000\n    call target\n    push rax\n"
                    "target:\n    xor eax, eax\n    out 0xf4, al\n")
    out = subprocess.run([sys.executable, "-m", "minivmm", "run", str(path), "--trace",
                          "--timeout", "20"], capture_output=True, text=True, timeout=60)
    line = next(x for x in (out.stdout + out.stderr).splitlines() if "] MMIO" in x)
    assert "by call 0x" in line and "push" not in line, line
