"""Payloads run end to end on the real /dev/kvm, in every CPU mode."""
import json

import pytest

from minivmm import abi
from minivmm import machine as machine_module
from minivmm.cli import main as cli_main
from minivmm.machine import Machine, MachineError
from minivmm.payload import PayloadError, assemble_source
from minivmm.x86 import layout as L
from tests.conftest import payload
from tests.kvm.conftest import kvm_resets_at_shutdown, shutdown_like_svm


def run(name, **kw):
    timeout = kw.pop("timeout", 20)
    with Machine(payload(name), **kw) as m:
        return m.run(timeout=timeout)


@pytest.mark.parametrize("name,mode,text,end", [
    ("hello_real", "real", "Hello from real mode\n", "hlt"),
    ("hello_protected", "protected", "Hello from protected mode\n", "hlt"),
    ("hello_long", "long", "Hello from long mode\n", "exit-port"),
])
def test_hello_in_each_mode(name, mode, text, end):
    r = run(name)
    assert r.payload.mode == mode
    st, = r.vcpus
    assert st.console.decode() == text
    assert st.end.reason == end
    assert r.ok
    # one IO exit per console byte, plus the exit port in long mode
    assert st.exits_by_name()["io"] == len(text) + (end == "exit-port")


def test_long_mode_runs_at_cpl3_by_default():
    with Machine(payload("hello_long")) as m:
        sregs = m.states[0].vcpu.get_sregs()
        assert sregs.cs.dpl == 3 and sregs.cs.selector & 3 == 3 and sregs.cs.l == 1
        assert sregs.efer & 0x500 == 0x500
        assert sregs.tr.base == L.vcpu_block(0)


def test_multi_vcpu_each_prints_its_index():
    r = run("multi_vcpu", vcpus=4)
    assert [st.console.decode() for st in r.vcpus] == [f"hello from vCPU {i}\n" for i in range(4)]
    assert all(st.end.reason == "exit-port" and st.end.code == 0 for st in r.vcpus)


def test_more_vcpus_than_host_cpus():
    r = run("multi_vcpu", vcpus=12)
    assert sorted(st.console.decode() for st in r.vcpus) == \
        sorted(f"hello from vCPU {i}\n" for i in range(12))


def test_exception_is_reported_with_vector_and_instruction():
    r = run("exception")
    end = r.vcpus[0].end
    assert end.reason == "exception" and end.vector == 13
    assert end.detail["error_code"] == 0
    assert end.instruction.startswith("hlt")
    assert not r.ok


def test_page_fault_reports_cr2():
    src = ";! mode: long\n    mov rax, 0x400000000000\n    mov qword ptr [rax], 1\n"
    with Machine(assemble_source(src, "pf.asm")) as m:
        r = m.run(timeout=20)
    end = r.vcpus[0].end
    assert (end.reason, end.vector) == ("exception", 14)
    assert end.detail["cr2"] == 0x400000000000
    assert end.detail["error_code"] & 0x6 == 0x6     # write, user
    assert end.instruction.startswith("mov qword ptr [rax], 1")


def test_spin_is_stopped_by_timeout_with_location():
    r = run("spin", timeout=0.3)
    end = r.vcpus[0].end
    assert end.reason == "timeout"
    assert 0x10000 <= end.rip < 0x10000 + len(r.payload.code)
    assert end.instruction.split()[0] in ("pause", "jmp")
    assert r.vcpus[0].console == b"."


def test_mmio_outside_ram_names_the_writing_instruction():
    r = run("mmio")
    end = r.vcpus[0].end
    assert end.reason == "unhandled-mmio"
    assert end.detail["phys_addr"] == 0xD0000000 and end.detail["len"] == 4
    assert end.detail["is_write"] and end.detail["data"] == 0x11223344
    # RIP is past the store; the report names the store itself
    assert end.instruction.startswith("mov dword ptr [rdi], 0x11223344")


def test_out_names_the_instruction_not_the_next_one():
    r = run("hello_long")
    end = r.vcpus[0].end
    assert end.instruction.startswith("out 0xf4, al")
    ins = r.payload.instruction_ending_at(end.rip)
    assert ins.text == "out 0xf4, al"


@pytest.mark.parametrize("host", ["this-host", "simulated-svm"])
def test_triple_fault_reports_registers(monkeypatch, host):
    if host == "simulated-svm":
        shutdown_like_svm(monkeypatch)
    # kvm_amd INITs the vCPU before this exit; kvm_pvm and kvm_intel keep the fault's
    # state: which one this host does is measured, not assumed
    reset = kvm_resets_at_shutdown()
    r = run("triple_fault")
    end = r.vcpus[0].end
    assert end.reason == "shutdown"
    if reset:
        assert end.detail["registers_lost"] is True and "registers" not in end.detail
        assert end.rip is None and end.instruction is None
        assert end.summary() == ("triple fault; the vCPU state was reset by KVM on SHUTDOWN "
                                 "(SVM), registers lost")
        return
    regs = end.detail["registers"]
    assert regs["rip"] == end.rip and regs["cr3"] == L.PML4
    assert "ud2" in end.instruction
    # KVM kept the fault's state: not taken for a reset
    assert "registers_lost" not in end.detail
    assert end.summary().startswith("triple fault (KVM_EXIT_SHUTDOWN) at 0x10007 (ud2")


def reset_like_svm(vcpu):
    """The INIT state svm.c shutdown_interception() leaves before KVM_EXIT_SHUTDOWN
    (kvm_vcpu_reset(vcpu, true)): CS 0xf000 based at 0xffff0000, RIP 0xfff0, real mode."""
    sregs = vcpu.get_sregs()
    for seg in (sregs.cs, sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss):
        seg.selector, seg.base, seg.limit, seg.type = 0, 0, 0xFFFF, 3
        seg.present, seg.s, seg.dpl, seg.db, seg.l, seg.g = 1, 1, 0, 0, 0, 0
    sregs.cs.selector, sregs.cs.base, sregs.cs.type = 0xF000, 0xFFFF0000, 0xB
    sregs.gdt.base = sregs.idt.base = 0
    sregs.gdt.limit = sregs.idt.limit = 0xFFFF
    sregs.cr0, sregs.cr3, sregs.cr4, sregs.efer = 0x60000010, 0, 0, 0
    vcpu.set_sregs(sregs)
    regs = abi.kvm_regs()
    regs.rip, regs.rflags = 0xFFF0, 0x2
    vcpu.set_regs(regs)


def test_triple_fault_where_kvm_reset_the_vcpu_says_the_registers_are_lost():
    # Simulates SVM: the vCPU is put in the INIT state after the SHUTDOWN exit, before the
    # end is built (Machine.trace runs first). Not INIT-state registers as the fault's.
    def trace(st, reason):
        if reason == abi.KVM_EXIT_SHUTDOWN:
            reset_like_svm(st.vcpu)
    with Machine(payload("triple_fault")) as m:
        m.trace = trace
        r = m.run(timeout=20)
    end = r.vcpus[0].end
    assert end.reason == "shutdown" and end.detail["registers_lost"] is True
    assert "registers" not in end.detail            # they would be the reset's
    assert end.rip is None and end.instruction is None  # not whatever is at 0xfff0
    assert end.summary() == ("triple fault; the vCPU state was reset by KVM on SHUTDOWN "
                             "(SVM), registers lost")
    assert not r.ok


@pytest.mark.parametrize("rsp", [0xDEADBEEF0000, 0x40001000])   # outside memory, inside
def test_exception_port_written_by_the_payload_is_not_a_cpu_exception(rsp):
    # Only minivmm's stubs report exceptions there; a frame read at RSP would be made up
    src = f";! mode: long\n    mov rsp, {rsp:#x}\n    mov eax, 14\n    out 0xe0, eax\n"
    with Machine(assemble_source(src, "e0.asm")) as m:
        r = m.run(timeout=20)
    end = r.vcpus[0].end
    assert end.reason == "exception-port-by-payload" and end.vector is None and not r.ok
    assert end.detail["registers"]["rsp"] == rsp and end.detail["value"] == 14
    assert end.summary().startswith("the payload wrote minivmm's exception-report port 0xe0")
    assert "out 0xe0, eax" in end.summary()


@pytest.mark.parametrize("mode,rsp", [
    ("long", 0xDEADBEEF0000),                                  # outside memory
    ("protected", 0x20000000),
    ("protected", L.system_slot_size(1) - 8),                  # the frame runs off slot 0
])
def test_the_stubs_report_with_no_frame_to_read_is_said_to_be_unreadable(mode, rsp):
    # CPL0 code that jumps to the stubs' out with RSP where no whole frame can be read:
    # not an exception made up from whatever is there, nor a crash of the reader
    out = L.STUB_COMMON + 5                    # push rax; mov eax, [rsp + W]; out 0xe0, eax
    reg = "r" if mode == "long" else "e"
    src = (f";! mode: {mode}\n" + (";! cpl: 0\n" if mode == "long" else "")
           + f"    mov {reg}sp, {rsp:#x}\n    mov eax, 0x8765430d\n    mov {reg}cx, {out:#x}\n"
           f"    jmp {reg}cx\n")
    with Machine(assemble_source(src, "unread.asm")) as m:
        r = m.run(timeout=20)
    end = r.vcpus[0].end
    assert (end.reason, end.vector, end.detail["rsp"], end.detail["value"]) == \
        ("unreadable-exception-frame", None, rsp, 0x8765430d), end.summary()
    # the frame is outside memory, not RSP (0x1ffff8 is in slot 0): it said "RSP ... is
    # outside guest memory"
    assert f"no frame to read (the frame at RSP {rsp:#x} is not in guest memory)" in \
        end.summary()
    assert not r.ok


def test_unhandled_port():
    src = ";! mode: long\n    mov al, 7\n    out 0x80, al\n"
    with Machine(assemble_source(src, "port.asm")) as m:
        r = m.run(timeout=20)
    end = r.vcpus[0].end
    assert end.reason == "unhandled-io"
    assert end.detail["port"] == 0x80 and end.detail["direction"] == "out"
    assert end.detail["data"] == 7 and end.instruction.startswith("out 0x80, al")


def test_entry_registers_follow_the_convention():
    src = (";! mode: long\n    mov rax, rdi\n    out 0xf0, eax\n    mov rax, rsi\n"
           "    out 0xf0, eax\n    mov rax, rdx\n    out 0xf0, eax\n    xor eax, eax\n"
           "    out 0xf4, al\n")
    tags = {}
    with Machine(assemble_source(src, "regs.asm"), vcpus=2, pages=64) as m:
        m.on_sync = lambda st, tag: tags.setdefault(st.index, []).append(tag)
        m.run(timeout=20)
    assert tags[0] == [0, L.DATA_GPA, 32]
    assert tags[1] == [1, L.DATA_GPA + 32 * 4096, 32]


@pytest.mark.parametrize("kw,match", [
    (dict(vcpus=0), "between 1 and"),
    (dict(vcpus=100000), "between 1 and"),
    (dict(pages=0), "at least 1"),
    (dict(pages=L.MAX_DATA_PAGES + 1), "more than this machine can map"),
])
def test_bad_machine_requests(kw, match):
    with pytest.raises(MachineError, match=match):
        Machine(payload("hello_long"), **kw)


def test_negative_timeout_rejected():
    with Machine(payload("hello_long")) as m:
        with pytest.raises(MachineError, match="negative"):
            m.run(timeout=-1)


def test_exit_reason_names_cover_the_machine_ends():
    assert abi.EXIT_NAMES[abi.KVM_EXIT_DIRTY_RING_FULL] == "DIRTY_RING_FULL"


def test_out_is_named_whether_rip_is_past_it_or_still_at_it():
    # kvm_pvm moves RIP past an OUT before exiting; VMX/SVM complete it on the next
    # KVM_RUN, so RIP may still point at the out. Both must name the out.
    with Machine(payload("hello_long")) as m:
        st = m.states[0]
        out = next(i for i in m.payload.listing if i.text == "out 0xf4, al")
        past = m.describe_instruction(st, out.address + out.size, after=True, io_out=True)
        at = m.describe_instruction(st, out.address, after=True, io_out=True)
        assert past.startswith("out 0xf4, al") and at.startswith("out 0xf4, al")


def _rip_back_to_the_out(ports):
    """A Machine.trace that leaves RIP at the `out` that exited to one of ``ports``, as
    VMX/SVM do (kvm_fast_pio_out: RIP moves on at the next KVM_RUN); kvm_pvm leaves it past.
    Only for the 2-byte `out imm8, al/eax` of the sources below."""
    def trace(st, reason):
        io = st.vcpu.run_struct.io
        if reason == abi.KVM_EXIT_IO and io.direction == abi.KVM_EXIT_IO_OUT and \
                io.port in ports:
            regs = st.vcpu.get_regs()
            regs.rip -= 2
            st.vcpu.set_regs(regs)
    return trace


@pytest.mark.parametrize("src,port,reason", [
    (open(payload("hello_long")).read(), L.PORT_EXIT, "exit-port"),
    (";! mode: long\n    mov al, 7\n    out 0x80, al\n    nop\n", 0x80, "unhandled-io"),
    (";! mode: long\n    mov rsp, 0xdeadbeef0000\n    mov eax, 14\n    out 0xe0, eax\n"
     "    nop\n", L.PORT_EXCEPTION, "exception-port-by-payload"),
], ids=["exit-port", "unhandled-io", "exception-port-by-payload"])
def test_out_end_rip_is_past_the_out_whether_kvm_left_it_there_or_not(src, port, reason):
    ends = []
    for trace in (None, _rip_back_to_the_out({port})):
        with Machine(assemble_source(src, "out.asm")) as m:
            m.trace = trace
            ends.append(m.run(timeout=20).vcpus[0].end)
    past, at = ends
    assert past.reason == at.reason == reason
    assert at.rip == past.rip and at.instruction == past.instruction
    ins = assemble_source(src, "out.asm").instruction_ending_at(at.rip)
    assert ins.text.startswith("out ") and at.instruction.startswith(ins.text)


def test_two_identical_outs_name_the_one_that_exited():
    # RIP at the second `out 0x80, al` is past the first (kvm_pvm) or at the second
    # (VMX/SVM): the pending out is completed to tell which
    src = ";! mode: long\n    mov al, 7\n    out 0x80, al\n    out 0x80, al\n    nop\n"
    for trace in (None, _rip_back_to_the_out({0x80})):
        with Machine(assemble_source(src, "twice.asm")) as m:
            m.trace = trace
            end = m.run(timeout=20).vcpus[0].end
        assert end.reason == "unhandled-io" and end.rip == L.CODE + 4
        assert end.instruction == "out 0x80, al  ; line 3"


def _end_of(src, name="t.asm"):
    with Machine(assemble_source(src, name)) as m:
        r = m.run(timeout=20)
    return r.vcpus[0].end


def test_a_payload_jumping_into_the_stubs_fakes_no_exception():
    end = _end_of(";! mode: long\n    mov rax, 0x5000\n    jmp rax\n")
    assert end.reason == "exception-port-by-payload" and end.vector is None


def test_a_trap_names_the_instruction_before_the_address_it_pushed():
    # #BP pushes the address after int3; the culprit ends there
    end = _end_of(";! mode: long\n    int3\n    xor eax, eax\n    out 0xf4, al\n")
    assert end.vector == 3 and end.rip == L.CODE + 1
    assert end.instruction.startswith("int3")


def test_an_instruction_the_guest_rewrote_is_named_as_it_ran():
    end = _end_of(";! mode: long\n;! cpl: 0\n    lea rdi, [rip + patch]\n"
                  "    mov word ptr [rdi], 0x0b0f\npatch:\n    nop\n    nop\n"
                  "    xor eax, eax\n    out 0xf4, al\n")
    assert end.vector == 6
    assert end.instruction.startswith("ud2  ; rewritten by the guest (line 6: nop)")


def test_a_rep_outs_names_itself_while_it_repeats():
    src = (";! mode: long\n    lea rsi, [rip + msg]\n    mov rcx, 3\n    mov dx, 0x80\n"
           "    rep outsb\nmsg:\n    .ascii \"abc\"\n")
    end = _end_of(src)
    assert end.reason == "unhandled-io" and end.instruction.startswith("rep outsb")


def test_dirty_stride_without_r8_writes_every_page():
    # `minivmm run` sets no R8: a stride of 0 is taken as 1, not a spin on page 0
    with Machine(payload("dirty_stride"), vcpus=2, pages=8, regs={"rcx": 2}) as m:
        r = m.run(timeout=20)
        assert r.ok, [st.end.summary() for st in r.vcpus]
        words = [int.from_bytes(m.data.read(L.DATA_GPA + 4096 * i, 8), "little")
                 for i in range(8)]
    assert words == [2] * 8


def test_an_out_not_in_the_listing_followed_by_a_like_out_keeps_its_rip():
    # The exiting out is .byte-encoded, so no listed instruction ends at RIP, and the next
    # instruction is an out to the same port: RIP must not be moved past that one
    src = ";! mode: long\n    mov eax, 7\n    .byte 0xe6, 0xf4\n    out 0xf4, al\n    hlt\n"
    with Machine(assemble_source(src, "bytes.asm")) as m:
        end = m.run(timeout=20).vcpus[0].end
    assert end.reason == "exit-port" and end.code == 7 and end.rip == L.CODE + 7


@pytest.mark.parametrize("mode,src", [
    ("long", "    mov rdi, 0xd0000000\n    mov ecx, 4\n    mov al, 0x55\n    rep stosb\n"),
    ("long", "    mov rdi, 0xd0000000\n    lea rsi, [rip]\n    mov ecx, 4\n    rep movsb\n"),
    ("protected", "    mov edi, 0x300000\n    mov ecx, 3\n    rep stosd\n"),
])
def test_rep_string_mmio_write_names_the_string_instruction(mode, src):
    # KVM keeps RIP at a `rep stos/movs` while it repeats: the write is the string
    # instruction's, not the one that ends at RIP (the `mov ecx`/`mov al` before it)
    with Machine(assemble_source(f";! mode: {mode}\n{src}", "reps.asm")) as m:
        r = m.run(timeout=20)
    end = r.vcpus[0].end
    assert end.reason == "unhandled-mmio" and end.detail["is_write"]
    assert end.instruction.startswith("rep "), end.instruction
    assert end.rip == m.payload.listing[-1].address


def test_mmio_write_just_before_a_rep_store_names_the_write():
    # RIP is at the rep stos here too, but the write was the mov's (RDI not advanced)
    src = (";! mode: long\n    mov rdi, 0xd0000000\n    mov ecx, 4\n"
           "    mov byte ptr [rdi], 1\n    rep stosb\n")
    with Machine(assemble_source(src, "mov_then_rep.asm")) as m:
        end = m.run(timeout=20).vcpus[0].end
    assert end.reason == "unhandled-mmio"
    assert end.instruction.startswith("mov byte ptr [rdi], 1"), end.instruction


@pytest.mark.parametrize("mode", ["real", "protected", "long"])
def test_in_from_the_exception_port_by_the_payload_is_reported(mode):
    # only the stubs may use port 0xe0; a payload's own `in` was answered 0 silently
    src = f";! mode: {mode}\n    in al, 0xe0\n    mov al, 4\n    out 0xf4, al\n"
    with Machine(assemble_source(src, "in_e0.asm")) as m:
        end = m.run(timeout=20).vcpus[0].end
    assert end.reason == "unhandled-io", end.summary()
    assert end.detail["port"] == 0xE0 and end.detail["direction"] == "in"
    assert end.instruction.startswith("in al, 0xe0")


def test_cpl3_payload_jumping_into_the_stubs_with_a_frame_is_not_an_exception():
    # a frame-shaped stack (CS 0x1b) must not make up a #PF: the real stubs run at CPL0
    src = (";! mode: long\n    push 0x23\n    push rsp\n    pushfq\n    push 0x1b\n"
           "    lea rax, [rip + here]\n    push rax\n    push 0\n    push 14\n"
           f"here:\n    jmp qword ptr [rip + tgt]\ntgt:\n    .quad {L.STUB_COMMON:#x}\n")
    with Machine(assemble_source(src, "fake.asm")) as m:
        end = m.run(timeout=20).vcpus[0].end
    assert end.reason == "exception-port-by-payload" and end.vector is None, end.summary()


# Real and protected mode get exception stubs too (an IVT at 0; a 32-bit IDT): a fault
# there ran off into the zeroed IVT until the timeout, or ended as a bare triple fault
@pytest.mark.parametrize("mode,body,vector,error,at,ins", [
    # no error code where the CPU pushes none (#DE, #BP, #UD; anything in real mode)
    ("real", "    mov ax, 5\n    xor dx, dx\n    xor cx, cx\n    div cx\n", 0, None, 0x7, "div cx"),
    ("real", "    nop\n    int3\n", 3, None, 0x2, "int3"),
    ("real", "    mov ax, word ptr [0xffff]\n", 13, None, 0, "mov ax, word ptr [0xffff]"),
    ("protected", "    nop\n    ud2\n", 6, None, L.CODE + 1, "ud2"),
    ("protected", "    mov ax, 0x33\n    mov ds, ax\n", 13, 0x30, L.CODE + 4, "mov ds, ax"),
])
def test_an_exception_outside_long_mode_is_reported(mode, body, vector, error, at, ins):
    src = f";! mode: {mode}\n{body}    hlt\n"
    with Machine(assemble_source(src, f"{mode}_exc.asm")) as m:
        r = m.run(timeout=20)
    end = r.vcpus[0].end
    assert (end.reason, end.vector, end.rip) == ("exception", vector, at), end.summary()
    assert end.detail["error_code"] == error and end.instruction.startswith(ins), end.summary()
    assert not r.ok


@pytest.mark.parametrize("mode", ["real", "protected"])
def test_a_payload_jumping_into_the_stubs_outside_long_mode_fakes_no_exception(mode):
    # the stack holds no frame the CPU pushed (CS is not the payload's / minivmm's)
    far = "    push 0\n    push 0\n    push 0\n    push 0\n    push 0x5060\n    retf\n" \
        if mode == "real" else \
        "    push 0\n    push 0\n    push 0\n    mov eax, 0x5060\n    jmp eax\n"
    with Machine(assemble_source(f";! mode: {mode}\n{far}", "jump.asm")) as m:
        end = m.run(timeout=20).vcpus[0].end
    assert end.reason == "exception-port-by-payload", end.summary()


# From a probe of the real/protected-mode stubs: every frame the CPU pushes is reported as
# the exception it is, with the instruction that raised it named
_FAR_TO_0FFF = "    .byte 0xea\n    .word there + 0x10\n    .word 0x0fff\nthere:\n"


@pytest.mark.parametrize("mode,body,vector,at,cs,ins", [
    # a far jump moved CS: any segment is one the CPU may push in real mode (it was
    # refused as "the payload wrote the port itself"); the IP is named in that segment
    ("real", _FAR_TO_0FFF + "    nop\n    xor cx, cx\n    div cx\n", 0, 0x18, 0x0FFF, "div cx"),
    # SP near 0: the frame wraps at 64 KiB (it was read past the segment, and refused)
    ("real", "    mov sp, 4\n    xor cx, cx\n    div cx\n", 0, 0x5, 0x1000, "div cx"),
    # `int n` pushes the address past it: it is the instruction named, not the next one
    ("real", "    int 6\n    mov ax, 1\n", 6, 0x2, 0x1000, "int 6"),
    ("real", "    nop\n    int 0\n    nop\n", 0, 0x3, 0x1000, "int 0"),
    # a payload's own GDT with another ring-0 code selector (it was refused)
    ("protected", "    lgdt [gdtr]\n    .byte 0xea\n    .long there\n    .word 0x18\nthere:\n"
     "    xor ecx, ecx\n    div ecx\n    hlt\ngdtr:\n    .word 4*8-1\n    .long gdt\ngdt:\n"
     "    .quad 0\n    .quad 0x00cf9a000000ffff\n    .quad 0x00cf92000000ffff\n"
     "    .quad 0x00cf9a000000ffff\n", 0, L.CODE + 0x11, 0x18, "div ecx"),
    # ... whose base is not 0: EIP is an offset in it (it was read as an address, and the
    # zeroes there named as `add byte ptr [eax], al`)
    ("protected", "    lgdt [gdtr]\n    .byte 0xea\n    .long there - 0x10000\n    .word 0x18\n"
     "there:\n    xor ecx, ecx\n    div ecx\n    hlt\ngdtr:\n    .word 4*8-1\n    .long gdt\n"
     "gdt:\n    .quad 0\n    .quad 0x00cf9a000000ffff\n    .quad 0x00cf92000000ffff\n"
     "    .quad 0x00cf9a010000ffff\n", 0, 0x11, 0x18, "div ecx  ; line 8"),
])
def test_every_frame_the_cpu_pushed_outside_long_mode_is_an_exception(mode, body, vector, at,
                                                                     cs, ins):
    with Machine(assemble_source(f";! mode: {mode}\n{body}    hlt\n", "exc.asm")) as m:
        end = m.run(timeout=20).vcpus[0].end
    assert (end.reason, end.vector, end.rip, end.detail["cs"]) == ("exception", vector, at, cs), \
        end.summary()
    assert end.instruction.startswith(ins), end.summary()


def _own_gdt(body: str, code: bool) -> str:
    """A protected-mode payload that loads its own GDT, whose selector 0x18 is a flat
    code (``code``) or data segment based at 0x10000, then runs ``body``."""
    return (";! mode: protected\n    lgdt [gdtr]\n" + body + "gdtr:\n    .word 4*8-1\n"
            "    .long gdt\ngdt:\n    .quad 0\n    .quad 0x00cf9a000000ffff\n"
            "    .quad 0x00cf92000000ffff\n"
            f"    .quad {0x00cf9a010000ffff if code else 0x00cf92010000ffff:#018x}\n")


def test_an_end_in_a_protected_mode_segment_not_based_at_0_names_its_instruction():
    # EIP is an offset in CS, whose base came from the payload's own GDT
    src = _own_gdt("    .byte 0xea\n    .long there - 0x10000\n    .word 0x18\nthere:\n"
                   "    nop\n    hlt\n", code=True)
    with Machine(assemble_source(src, "seg.asm")) as m:
        end = m.run(timeout=20).vcpus[0].end
    assert (end.reason, end.rip, end.instruction) == ("hlt", 0x11, "hlt  ; line 8"), \
        end.summary()


_SS_BASED_AT_BLOCK = (
    "    lgdt [gdtr]\n    mov ax, 0x18\n    mov ss, ax\n    mov esp, 0x8000\n{body}    hlt\n"
    "gdtr:\n    .word 4*8-1\n    .long gdt\ngdt:\n    .quad 0\n    .quad 0x00cf9a000000ffff\n"
    "    .quad 0x00cf92000000ffff\n    .quad 0x00cf92040000ffff\n")    # SS base 0x40000


@pytest.mark.parametrize("body,vector,error,at,ins", [
    ("    ud2\n", 6, None, L.CODE + 0x14, "ud2  ; line 6"),
    ("    mov ax, 0x1234\n    mov ds, ax\n", 13, 0x1234, L.CODE + 0x18, "mov ds, ax  ; line 7"),
])
def test_a_protected_mode_exception_on_a_stack_not_based_at_0_is_reported(body, vector, error,
                                                                          at, ins):
    # the stub's frame is at SS's base + ESP: it was read at ESP, and a #UD or a #GP was
    # reported as whatever that held (#DE, vector 0, with this stack's zeroes)
    src = ";! mode: protected\n" + _SS_BASED_AT_BLOCK.format(body=body)
    with Machine(assemble_source(src, "ss.asm")) as m:
        end = m.run(timeout=20).vcpus[0].end
        # the CS the CPU pushed where the SDM says, SS's base + ESP (0x8000) - 8
        sdm_cs = int.from_bytes(m.system.read(0x40000 + 0x8000 - 8, 4), "little")
    assert (end.reason, end.vector, end.rip) == ("exception", vector, at), end.summary()
    assert (end.detail["error_code"], end.instruction) == (error, ins), end.summary()
    # a note exactly where the host did not push there
    assert ("host_note" in end.detail) == (sdm_cs != 8), end.detail
    if sdm_cs != 8:
        # a host that pushed the CPU's part at ESP without SS's base: EIP, CS, EFLAGS
        # (and #GP's error code) end at ESP 0x8000, so they start 12 (16) bytes below it
        at = 0x8000 - (16 if error is not None else 12)
        assert end.detail["host_note"].startswith(f"this host pushed the CPU's frame at "
                                                  f"{at:#x}, as if SS's base were 0, not "
                                                  "0x40000"), end.detail


def _ss_based(base: int, esp: int, body: str) -> str:
    """_SS_BASED_AT_BLOCK with SS based at ``base`` and ESP ``esp``."""
    ss = 0x00cf92000000ffff | (base & 0xFFFF) << 16 | (base >> 16 & 0xFF) << 32 \
        | (base >> 24) << 56
    return ";! mode: protected\n" + _SS_BASED_AT_BLOCK.format(body=body).replace(
        "0x8000\n", f"{esp:#x}\n", 1).replace("0x00cf92040000ffff", f"{ss:#x}")


@pytest.mark.parametrize("body,vector,error,at", [
    ("    ud2\n", 6, None, L.CODE + 0x14),
    ("    mov ax, 0x1234\n    mov ds, ax\n", 13, 0x1234, L.CODE + 0x18),
])
def test_a_frame_at_the_top_of_slot_0_as_if_ss_based_at_0_is_read_whole(body, vector, error, at):
    # SS:ESP is in the data slot; ESP alone is the top of slot 0, where a host that leaves
    # out SS's base pushes the CPU's part: it ends exactly at the slot's end, and is read
    src = _ss_based(L.DATA_GPA - L.system_slot_size(1) + 0x8000, L.system_slot_size(1), body)
    with Machine(assemble_source(src, "top.asm")) as m:
        end = m.run(timeout=20).vcpus[0].end
    assert (end.reason, end.vector, end.rip, end.detail["error_code"]) == \
        ("exception", vector, at, error), end.summary()


def test_a_faked_frame_on_an_ss_based_stack_with_nothing_at_esp_is_no_exception():
    # the stub's frame (at SS's base + ESP) is no CPU's, and nothing is at ESP alone to
    # look for the CPU's part in: the payload wrote the port, no crash of the reader
    out = L.STUB_COMMON + 5
    src = _ss_based(0x10000000, 0x30008000, f"    mov eax, 13\n    mov ecx, {out:#x}\n"
                    "    jmp ecx\n")
    with Machine(assemble_source(src, "fake.asm")) as m:
        end = m.run(timeout=20).vcpus[0].end
    assert (end.reason, end.vector, end.detail["value"]) == \
        ("exception-port-by-payload", None, 13), end.summary()


@pytest.mark.parametrize("mode,body,out", [
    ("real", "    push 0\n    push 0\n    push 0\n    push 0\n    push 0x5060\n    retf\n",
     "out 0xe0, ax"),
    ("protected", "    push 0\n    push 0\n    push 0\n    mov eax, 0x5060\n    jmp eax\n",
     "out 0xe0, eax"),
])
def test_the_stubs_out_is_named_outside_long_mode(mode, body, out):
    # as in long mode: the end (and --trace) name the stub's instruction, not nothing
    with Machine(assemble_source(f";! mode: {mode}\n{body}", "jump.asm")) as m:
        end = m.run(timeout=20).vcpus[0].end
    assert end.reason == "exception-port-by-payload", end.summary()
    assert end.instruction == f"{out}  ; exception stub", end.summary()


def test_a_payload_may_be_a_path_object_and_anything_else_is_named():
    # A pathlib.Path reached the Machine as if it were a Payload: AttributeError 'vcpus'
    import pathlib
    from minivmm import run_payload
    r = run_payload(pathlib.Path(payload("hello_long")), timeout=10)
    assert r.ok and r.vcpus[0].console == b"Hello from long mode\n"
    for wrong in (None, b"hello_long"):
        with pytest.raises(TypeError, match="a payload is a name, a path or a Payload"):
            Machine(wrong)
    with pytest.raises(PayloadError, match="pass assemble_source\\(text\\) instead"):
        Machine("mov al, 1\nhlt")


def test_a_plain_outs_at_rip_is_the_next_one_not_the_one_that_exited():
    # every host moves RIP past a plain outs before its exit (KVM's emulator writes RIP
    # back; kvm_pvm measured): RIP then points at the second of `outsb; outsb`
    src = (";! mode: long\n    lea rsi, [rip + msg]\n    mov dx, 0x80\n    outsb\n"
           "    outsb\n    nop\nmsg:\n    .ascii \"ab\"\n")
    end = _end_of(src)
    assert end.reason == "unhandled-io" and end.rip == L.CODE + 12
    assert end.instruction == "outsb dx, byte ptr [rsi]  ; line 4"


_CHATTY = (";! mode: long\n    mov ecx, 750\n    mov eax, 0x44434241\nagain:\n"
           "    out 0xe9, eax\n    dec ecx\n    jnz again\n    xor eax, eax\n    out 0xf4, al\n")


def test_a_guest_flooding_the_console_is_kept_to_the_limit(monkeypatch):
    # a guest printing for ever grew the console without bound (178 MB after 2 minutes)
    monkeypatch.setattr(machine_module, "CONSOLE_LIMIT", 1000)
    with Machine(assemble_source(_CHATTY, "chatty.asm")) as m:
        r = m.run(timeout=20)
    st = r.vcpus[0]
    assert r.ok and bytes(st.console) == b"ABCD" * 250 and st.console.dropped == 2000
    assert r.to_dict()["vcpus"][0]["console_dropped"] == 2000


def test_run_says_the_console_was_cut(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(machine_module, "CONSOLE_LIMIT", 1000)
    f = tmp_path / "chatty.asm"
    f.write_text(_CHATTY)
    assert cli_main(["run", str(f)]) == 0
    out = capsys.readouterr().out
    assert "vCPU 0 | (console output cut at 1000 bytes: 2000 more byte(s) dropped)" in out
    assert cli_main(["run", str(f), "--json"]) == 0
    vcpu = json.loads(capsys.readouterr().out)["vcpus"][0]
    assert vcpu["console"] == "ABCD" * 250 and vcpu["console_dropped"] == 2000


def test_ud_on_bytes_nothing_decodes_shows_the_bytes():
    # data run as code (push es is invalid in 64-bit mode): the end named no instruction
    # and showed nothing of what was there
    with Machine(assemble_source("nop\n.byte 0x06, 0xff\n", "ud.asm")) as m:
        st, = m.run(timeout=20).vcpus
    assert (st.end.reason, st.end.vector, st.end.rip) == ("exception", 6, L.CODE + 1)
    assert st.end.instruction is None and st.end.detail["bytes"].startswith("06 ff")
    assert len(st.end.detail["bytes"].split()) == 8          # the 8 bytes from RIP
    assert st.end.summary().endswith("at 0x10001 (no instruction decodes from bytes "
                                     + st.end.detail["bytes"] + ")")


def test_a_decodable_fault_has_no_bytes():
    with Machine(assemble_source("nop\nud2\n", "ud.asm")) as m:
        st, = m.run(timeout=20).vcpus
    assert st.end.instruction == "ud2  ; line 2" and "bytes" not in st.end.detail


def test_real_mode_stack_is_reachable_through_ss_on_the_last_vcpu():
    # the stack through SS:SP and through a copy of SS in ES is the same memory, on every
    # vCPU real mode allows (vCPU 24's SS would have been cut to 16 bits: 0, base 1 MiB)
    src = (";! mode: real\nmov ax, 0x1234\npush ax\nmov ax, ss\nmov es, ax\n"
           "mov bx, sp\nmov ax, word ptr es:[bx]\nhlt\n")
    seen = {}
    with Machine(assemble_source(src, "ss.asm"), vcpus=L.REAL_MODE_MAX_VCPUS) as m:
        m.on_end = lambda st: seen.__setitem__(st.index, st.vcpu.get_regs().rax & 0xFFFF)
        r = m.run(timeout=60)
    assert r.ok and seen == {i: 0x1234 for i in range(L.REAL_MODE_MAX_VCPUS)}


def test_a_repeating_store_to_mmio_through_a_protected_mode_es_with_a_base_is_named():
    # ES:EDI with ES based at 0x10000 (the payload's GDT): the write's address was compared
    # with EDI alone, so RIP at the `rep stosb` was taken as past it and bytes were misnamed
    src = _own_gdt("    mov ax, 0x18\n    mov es, ax\n    mov edi, 0x7fff0000\n"
                   "    mov ecx, 4\n    rep stosb\n    hlt\n", code=False)
    with Machine(assemble_source(src, "es.asm")) as m:
        end = m.run(timeout=20).vcpus[0].end
    assert end.reason == "unhandled-mmio" and end.instruction.startswith("rep stosb"), \
        end.summary()


@pytest.mark.parametrize("prefix,tail", [("0x67", "ud2"), ("0x66", "hlt"), ("0x2e, 0x3e", "ud2")])
def test_data_run_as_prefixes_names_the_line_of_the_instruction_after_it(prefix, tail):
    # `.byte 0x67` before `ud2`: the CPU reports the fault at the prefix, where the listing
    # has data, so the instruction was named without any line ("ud2")
    src = f";! mode: long\n    nop\n    .byte {prefix}\n    {tail}\n"
    with Machine(assemble_source(src, "prefix.asm"), pages=1) as m:
        end = m.run(timeout=10).vcpus[0].end
    n = prefix.count(",") + 1
    assert (end.reason, end.rip) == ("exception", 0x10001), end.summary()
    assert end.instruction == f"{tail}  ; line 4, after {n} byte(s) of data run as prefixes"


@pytest.mark.parametrize("mode", ["protected", "long"])
def test_data_run_as_an_opcode_is_not_called_prefixes(mode):
    # `.byte 0xcd` before `int3` runs as `int 0xcc` (opcode and immediate): no prefix in
    # it, so no "line 4 (int3), after 1 byte(s) of data run as prefixes"
    src = f";! mode: {mode}\n    nop\n    .byte 0xcd\n    int3\n    hlt\n"
    with Machine(assemble_source(src, "opcode.asm"), pages=1) as m:
        end = m.run(timeout=20).vcpus[0].end
    assert end.rip == 0x10001, end.summary()
    assert end.instruction == "int 0xcc", end.summary()


def test_rex_data_runs_as_a_prefix_in_long_mode():
    src = ";! mode: long\n    nop\n    .byte 0x48\n    ud2\n"
    with Machine(assemble_source(src, "rex.asm"), pages=1) as m:
        end = m.run(timeout=10).vcpus[0].end
    assert (end.reason, end.rip) == ("exception", 0x10001), end.summary()
    assert end.instruction == "ud2  ; line 4, after 1 byte(s) of data run as prefixes"
