"""A guest's own debug exceptions (#DB, vector 1), told apart by DR6 and named where the CPU
says: an instruction breakpoint and general detect are faults (RIP at the instruction, not
run), single-step and data breakpoints are traps (the instruction before RIP ran), icebp
is trap-like. Through `run` (text, --trace, --json) and `step`."""
import errno
import json

import pytest

from minivmm import abi, machine
from minivmm._sys import KvmError
from minivmm.kvm import Kvm
from minivmm.machine import Machine
from minivmm.payload import assemble_source
from minivmm.step import StepSession
from minivmm.vcpu import Vcpu
from minivmm.x86 import debug
from minivmm.x86 import layout as L
from tests.conftest import payload, run_cli

# Writing DR0-DR7 needs CPL0: emulated on kvm_pvm, the only code that sees a guest's own
# breakpoints there (docs/host-probes.md 7)
CODE_BP = {
    "long": ";! mode: long\n;! cpl: 0\n    lea rax, [rip + target]\n    mov dr0, rax\n",
    "protected": ";! mode: protected\n    lea eax, [target]\n    mov dr0, eax\n",
    # DR0 is linear: CS base 0x10000 + the offset (mov eax, imm32 is 6 bytes here)
    "real": ";! mode: real\n    mov eax, 0x10000 + 0x13\n    mov dr0, eax\n",
}


def end_of(src, name="t.asm"):
    p = assemble_source(src, name)
    with Machine(p) as m:
        return p, m.run(timeout=20).vcpus[0].end


def address_of(p, text):
    [ins] = [i for i in p.listing if i.text == text]
    return ins.address


@pytest.mark.parametrize("mode", ["long", "protected", "real"])
def test_a_code_breakpoint_is_a_fault_named_at_the_breakpointed_instruction(mode):
    reg = "ecx" if mode != "real" else "cx"
    src = CODE_BP[mode] + (f"    mov eax, 1\n    mov dr7, {'rax' if mode == 'long' else 'eax'}\n"
                           f"    nop\ntarget:\n    inc {reg}\n    hlt\n")
    p, end = end_of(src)
    target = address_of(p, f"inc {reg}")
    if mode == "real":
        assert target == 0x13, "CODE_BP['real'] hard-codes the target's offset"
    assert end.reason == "exception" and end.vector == 1, end.summary()
    # before, #DB was always a trap: the nop before the breakpoint was named
    assert end.rip == target and end.instruction.startswith(f"inc {reg}")
    d = end.detail["debug"]
    assert d["kind"] == "code-breakpoint" and d["fault"] is True
    assert d["breakpoints"][0]["dr"] == 0 and d["breakpoints"][0]["type"] == "execute"
    assert d["dr6"] & 0xF == 1
    assert "code-breakpoint DR0" in end.summary() and "a fault" in end.summary()


def test_a_single_step_the_payload_asked_for_is_a_trap_named_before_rip():
    p, end = end_of(";! mode: long\n    pushfq\n    or qword ptr [rsp], 0x100\n    popfq\n"
                    "    nop\n    mov eax, 7\n    out 0xf4, al\n")
    # TF set by popf traps after the instruction that follows it (SDM 18.3.1.4)
    assert end.vector == 1 and end.rip == address_of(p, "mov eax, 7")
    assert end.instruction.startswith("nop")
    assert end.detail["debug"]["kind"] == "single-step"
    assert end.detail["debug"]["dr6"] & debug.DR6_BS


def test_general_detect_is_a_fault_named_at_the_mov_dr():
    p, end = end_of(";! mode: long\n;! cpl: 0\n    mov eax, 0x2000\n    mov dr7, rax\n"
                    "    nop\n    mov rax, dr0\n    hlt\n")           # DR7.GD, then a MOV DR
    assert end.vector == 1 and end.rip == address_of(p, "mov rax, dr0")
    assert end.instruction.startswith("mov rax, dr0")
    assert end.detail["debug"]["kind"] == "general-detect"


def test_icebp_names_the_icebp_wherever_this_host_puts_rip():
    p, end = end_of(";! mode: long\n    nop\n    mov eax, 5\n    .byte 0xf1\n    nop\n"
                    "    mov eax, 7\n    out 0xf4, al\n")
    icebp = address_of(p, "mov eax, 5") + 5
    assert end.vector == 1 and end.instruction == "int1"
    d = end.detail["debug"]
    assert d["kind"] == "icebp" and d["icebp_at"] == icebp
    # hardware pushes the address past it; kvm_pvm (native CPL3) was measured pushing its own
    assert end.rip in (icebp, icebp + 1)
    assert ("this host pushed the icebp's own address" in d.get("note", "")) == (end.rip == icebp)


def test_icebp_after_an_icebp_byte_asks_the_host_where_rip_points():
    # the first icebp run is at `two`; the byte before it is an icebp too (never run), so
    # only where this host puts RIP for an icebp tells which one raised the #DB
    p, end = end_of(";! mode: long\n    jmp two\n    .byte 0xf1\ntwo:\n    .byte 0xf1\n"
                    "    nop\n    mov eax, 7\n    out 0xf4, al\n")
    two = L.CODE + 3                    # jmp rel8 (2 bytes), the icebp byte, then two
    assert address_of(p, f"jmp {two:#x}") == L.CODE
    assert end.detail["debug"]["kind"] == "icebp"
    assert end.detail["debug"]["icebp_at"] == two
    where = machine.probe_icebp_rip("long", 3)
    assert where in ("at", "after") and end.rip == two + (where == "after")


def test_probe_icebp_rip_says_none_where_no_icebp_reaches_the_stub():
    # kvm_pvm's emulator cannot run an icebp (KVM_EXIT_INTERNAL_ERROR): nothing to learn
    with Kvm() as kvm:
        where = machine.probe_icebp_rip("real", 0, kvm)
        assert where in ("at", "after", None)
        with Machine(assemble_source(";! mode: real\n    .byte 0xf1\n    hlt\n", "r.asm"),
                     kvm=kvm) as m:
            end = m.run(timeout=20).vcpus[0].end
    if where is None:
        assert end.reason == "internal-error" and end.instruction == "int1"
    else:
        assert end.vector == 1 and end.instruction == "int1"


def test_a_software_int_1_is_no_debug_condition_and_is_named_itself():
    p, end = end_of(";! mode: real\n    nop\n    int 1\n    hlt\n")
    if end.reason != "exception":
        # kvm_pvm delivers `int 1` only in real mode; elsewhere its emulator fails or #UD
        pytest.skip(f"this host did not deliver `int 1` to the #DB stub: {end.summary()}")
    assert end.vector == 1 and end.instruction.startswith("int 1")
    assert end.detail["debug"]["kind"] == "int-1"


# the guest writes an icebp over a listed nop (CPL3, where kvm_pvm delivers it)
ICEBP_OVER = (";! mode: long\n    lea rax, [rip + target]\n    mov byte ptr [rax], 0xf1\n"
              "    nop\ntarget:\n    nop\n    mov eax, 7\n    out 0xf4, al\n")


def test_an_icebp_the_guest_wrote_over_its_code_is_found_and_named_as_rewritten():
    # before: the listing's nop said no icebp was there: "unknown", the nop before named
    p, end = end_of(ICEBP_OVER)
    target = address_of(p, "mov byte ptr [rax], 0xf1") + 4
    d = end.detail["debug"]
    assert d["kind"] == "icebp" and d["icebp_at"] == target, end.summary()
    assert end.instruction == "int1  ; rewritten by the guest (line 6: nop)"


@pytest.mark.parametrize("src,named", [
    # over a listed nop; nop
    (";! mode: real\n    mov word ptr [target], 0x01cd\n    nop\ntarget:\n    nop\n"
     "    nop\n    hlt\n", "int 1  ; rewritten by the guest (line 5: nop)"),
    # written to 0x9000:0 and jumped to: nothing listed there
    (";! mode: real\n    mov ax, 0x9000\n    mov es, ax\n    mov dword ptr es:[0], 0xf401cd90\n"
     "    .byte 0xea\n    .word 0, 0x9000\n", "int 1"),
], ids=["rewritten", "elsewhere"])
def test_an_int_1_the_guest_wrote_is_a_software_interrupt_named_as_it_ran(src, named):
    # before: only the listing was asked, so the #DB's cause was "unknown", no instruction
    p, end = end_of(src)
    if end.reason != "exception":
        pytest.skip(f"this host did not deliver `int 1` to the #DB stub: {end.summary()}")
    assert end.detail["debug"]["kind"] == "int-1"
    assert end.instruction == named
    # stepped, it was blamed on the step ("the single-step trap went to the guest's #DB")
    with StepSession(p) as s:
        list(s.run(count=20))
    assert s.end.instruction == named and "why" not in s.end.detail


def test_a_data_breakpoint_is_a_trap_named_at_the_writer_or_the_host_ignores_it():
    p, end = end_of(";! mode: long\n;! cpl: 0\n    mov rbx, 0x40000000\n    mov dr1, rbx\n"
                    "    mov eax, 0xd00004\n    mov dr7, rax\n    nop\n"   # DR1: write, 4 bytes
                    "    mov dword ptr [rbx], 1\n    inc ecx\n    hlt\n")
    if end.reason == "hlt":
        # kvm_pvm's emulator checks no data breakpoint (docs/host-probes.md 2 and 7)
        pytest.skip("this host's KVM raised no #DB for a guest data breakpoint (DR7 R/W1 = "
                    f"01, DR1 = 0x40000000): the guest ran to {end.instruction}")
    assert end.vector == 1 and end.rip == address_of(p, "inc ecx")
    assert end.instruction.startswith("mov dword ptr [rbx], 1")
    assert end.detail["debug"]["kind"] == "data-breakpoint"


def test_without_dr6_a_db_is_named_as_a_trap_and_says_so(monkeypatch):
    def refuse(self):
        raise KvmError("KVM_GET_DEBUGREGS", errno.EINVAL)
    monkeypatch.setattr(Vcpu, "get_debugregs", refuse)
    p, end = end_of(open(payload("breakpoint")).read(), "breakpoint.asm")
    assert end.detail["debug"]["kind"] == "unknown"
    assert "DR6 unreadable" in end.summary()
    assert end.instruction.startswith("nop")          # the old rule: the one before RIP


def test_without_dr6_in_guest_stepping_takes_every_db_as_a_step(monkeypatch):
    def refuse(self):
        raise KvmError("KVM_GET_DEBUGREGS", errno.EINVAL)
    monkeypatch.setattr(Vcpu, "get_debugregs", refuse)
    with StepSession(payload("hello_long"), mechanism="in-guest") as s:
        steps = list(s.run(count=0))
    assert s.end.reason == "exit-port" and s.console.decode() == "Hello from long mode\n"
    assert len(steps) > 100


def test_debugregs_round_trip_and_bad_flags_are_refused():
    with Machine(payload("hello_long")) as m:
        vcpu = m.states[0].vcpu
        dr = vcpu.get_debugregs()
        assert dr.dr6 == debug.DR6_INIT and dr.dr7 & 0xFF == 0
        dr.db[2], dr.dr7 = 0x12345, 0x10
        vcpu.set_debugregs(dr)
        back = vcpu.get_debugregs()
        assert back.db[2] == 0x12345 and back.dr7 & 0x30 == 0x10
        back.flags = 1                      # api.rst 4.34: flags must be 0
        with pytest.raises(KvmError) as e:
            vcpu.set_debugregs(back)
        assert e.value.errno == errno.EINVAL
        with pytest.raises(TypeError):
            vcpu.set_debugregs(abi.kvm_regs())


# -- the command line --

def test_run_text_trace_and_json_name_the_breakpointed_instruction():
    proc = run_cli("run", "breakpoint")
    assert proc.returncode == 1
    assert ("CPU exception #DB debug: code-breakpoint DR0 (execute 0x10017), a fault (the "
            "instruction at RIP has not run), DR6 0xffff0ff1, at 0x10017 (inc ecx  ; line 15)"
            in proc.stdout)
    proc = run_cli("run", "--trace", "breakpoint")
    assert "by out 0xe0, eax  ; exception stub" in proc.stdout
    assert "at 0x10017 (inc ecx  ; line 15)" in proc.stdout
    proc = run_cli("run", "--json", "breakpoint")
    end = json.loads(proc.stdout)["vcpus"][0]["end"]
    assert end["instruction"] == "inc ecx  ; line 15" and end["rip"] == 0x10017
    assert end["debug"]["kind"] == "code-breakpoint" and end["debug"]["fault"] is True


def test_trace_ioctls_decodes_get_debugregs():
    proc = run_cli("run", "--trace-ioctls", "breakpoint")
    line = next(l for l in proc.stdout.splitlines() if "KVM_GET_DEBUGREGS" in l)
    assert "db=[0x10017, 0, 0, 0], dr6=0xffff0ff1, dr7=0x401, flags=0}) = 0" in line


# -- the stepper --

def test_stepping_ends_at_the_payloads_own_code_breakpoint_without_blaming_the_step():
    with StepSession(payload("breakpoint")) as s:
        steps = list(s)
    assert steps[-1].instruction == "nop"
    assert s.end.vector == 1 and s.end.instruction.startswith("inc ecx")
    assert s.end.detail["debug"]["kind"] == "code-breakpoint"
    # "the single-step trap went to the guest's #DB handler" is for a step's own #DB only
    assert "why" not in s.end.detail


def test_in_guest_stepping_ends_at_an_icebp_instead_of_stepping_it_forever():
    src = (";! mode: long\n    nop\n    mov eax, 5\n    .byte 0xf1\n    nop\n"
           "    mov eax, 7\n    out 0xf4, al\n")
    with StepSession(assemble_source(src, "i.asm"), mechanism="in-guest") as s:
        steps = list(s.run(count=20))
        dr6 = s.vcpu.get_debugregs().dr6
    # each step's BS is cleared (DR6 is sticky): the icebp's #DB has none, so it is no step
    assert [st.instruction for st in steps] == ["nop", "mov eax, 5"]
    assert s.end.vector == 1 and s.end.instruction == "int1"
    assert s.end.detail["debug"]["kind"] == "icebp"
    assert not dr6 & debug.DR6_BS


def test_in_guest_stepping_ends_at_an_icebp_the_guest_wrote():
    # before: it was found nowhere, and the stepper took its #DB for a step, forever
    with StepSession(assemble_source(ICEBP_OVER, "i.asm"), mechanism="in-guest") as s:
        steps = list(s.run(count=20))
    assert len(steps) == 3 and s.end is not None and s.end.vector == 1
    assert s.end.detail["debug"]["kind"] == "icebp"


def test_in_guest_stepping_takes_no_db_for_a_step_when_dr6_says_none(monkeypatch):
    # an icebp not found: the cause is unknown, but DR6 was read and has no BS
    monkeypatch.setattr(machine, "is_icebp", lambda ins: False)
    with StepSession(assemble_source(ICEBP_OVER, "i.asm"), mechanism="in-guest") as s:
        steps = list(s.run(count=20))
    assert len(steps) == 3 and s.end is not None and s.end.vector == 1
    assert s.end.detail["debug"]["kind"] == "unknown"


def test_in_guest_stepping_leaves_dr6_clean_after_each_step():
    with StepSession(payload("hello_long"), mechanism="in-guest") as s:
        for _ in s.run(count=3):
            assert s.vcpu.get_debugregs().dr6 == debug.DR6_INIT
        assert s.steps == 3
