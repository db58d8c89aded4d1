"""The CPU state minivmm.x86.modes builds, checked without KVM against the Intel SDM
(vol. 3, 3.4.5 descriptors, 6.14.1 gates, 8.7 / 19.5.2 TSS and I/O bitmap, 4.5 paging) and
against the checks stock KVM makes where kvm_pvm is laxer: vmx.c guest_state_valid()
(VMX without unrestricted guest: rmode_segment_valid, code/stack/data_segment_valid,
tr_valid, ldtr_valid, cs_ss_rpl_check) and the VM-entry checks on guest segments (SDM
vol. 3, 27.3.1.2: accessed bits, limit vs G, CS.L with CS.D, TR type 11 in IA-32e mode)."""
import struct

import pytest

from minivmm import abi
from minivmm.machine import Machine, MachineError
from minivmm.memory import GuestMemory
from minivmm.payload import assemble_source
from minivmm.x86 import layout as L, modes


class FakeVcpu:
    """KVM_GET_SREGS of a fresh vCPU as vmx.c vmx_vcpu_reset() leaves it; records sets."""

    def __init__(self):
        s = abi.kvm_sregs()
        for name in ("cs", "ds", "es", "fs", "gs", "ss"):
            seg = getattr(s, name)
            seg.limit, seg.type, seg.present, seg.s = 0xFFFF, 3, 1, 1
        s.cs.selector, s.cs.base, s.cs.type = 0xF000, 0xFFFF0000, 11
        s.tr.limit, s.tr.type, s.tr.present = 0xFFFF, 11, 1
        s.ldt.limit, s.ldt.type, s.ldt.present = 0xFFFF, 2, 1
        s.gdt.limit = s.idt.limit = 0xFFFF
        s.cr0 = 0x60000010
        self.sregs, self.regs = s, None

    def get_sregs(self):
        return self.sregs

    def set_sregs(self, sregs):
        self.sregs = sregs

    def set_regs(self, regs):
        self.regs = regs


def state(mode, cpl=3, index=0):
    v = FakeVcpu()
    modes.setup_vcpu(v, mode, cpl, index, {"rdi": index})
    return v.sregs, v.regs


def limit_ok(seg):
    """SDM 27.3.1.2: limit bits 11:0 not all ones -> G = 0; bits 31:20 not zero -> G = 1."""
    return not ((seg.limit & 0xFFF) != 0xFFF and seg.g) and not (seg.limit >> 20 and not seg.g)


def vmx_problems(s, regs):
    """What VMX (entry checks, or vmx.c guest_state_valid without unrestricted guest)
    would refuse in this state; [] when it would run it."""
    bad = []
    data = ("ds", "es", "fs", "gs")
    if not s.cr0 & 1:      # real mode: vm86 needs base = selector << 4, limit 0xffff
        for name in ("cs", "ss") + data:
            seg = getattr(s, name)
            if seg.base != seg.selector << 4 or seg.limit != 0xFFFF or seg.g or seg.db:
                bad.append(f"rmode {name}")
        return bad
    ia32e = bool(s.efer & modes.EFER_LMA)
    cs, ss = s.cs, s.ss
    if cs.selector & 3 != ss.selector & 3:
        bad.append("cs/ss rpl")
    if ~cs.type & 9 or not cs.s or not cs.present or cs.dpl != cs.selector & 3:
        bad.append("cs")
    if cs.dpl != ss.dpl:                # non-conforming CS: DPL = SS.DPL (= CPL)
        bad.append("cs.dpl vs ss.dpl")
    if ia32e and cs.l and cs.db:
        bad.append("cs l+d")
    if ss.type not in (3, 7) or not ss.s or not ss.present or ss.dpl != ss.selector & 3:
        bad.append("ss")
    for name in data:
        seg = getattr(s, name)
        if not seg.unusable and (not seg.s or not seg.present or not seg.type & 1
                                 or seg.dpl < seg.selector & 3):
            bad.append(name)
    tr = s.tr
    if tr.unusable or tr.selector & 4 or not tr.present or tr.s \
            or tr.type not in ((11,) if ia32e else (3, 11)):
        bad.append("tr")
    if not s.ldt.unusable and (s.ldt.type != 2 or s.ldt.s or not s.ldt.present):
        bad.append("ldtr")
    for name in ("cs", "ss", "tr") + data:
        if not limit_ok(getattr(s, name)):
            bad.append(f"{name} limit/G")
    if ia32e and (not s.cr4 & modes.CR4_PAE or not s.cr0 & modes.CR0_PG
                  or not s.efer & modes.EFER_LME):
        bad.append("ia32e control registers")
    if not regs.rflags & 2 or regs.rflags & ~0x3D7FD7:
        bad.append("rflags")
    return bad


@pytest.mark.parametrize("mode,cpl", [("real", 0), ("protected", 0), ("long", 0), ("long", 3)])
@pytest.mark.parametrize("index", [0, 1, 23])
def test_entry_state_passes_vmx_checks(mode, cpl, index):
    sregs, regs = state(mode, cpl, index)
    assert vmx_problems(sregs, regs) == []
    assert regs.rdi == index


def test_real_mode_stack_selector_names_its_block():
    for index in range(L.REAL_MODE_MAX_VCPUS):
        sregs, regs = state("real", 0, index)
        assert sregs.ss.selector << 4 == sregs.ss.base == L.vcpu_block(index)
        assert regs.rsp == L.USER_STACK_TOP_OFF


def test_real_mode_refuses_a_vcpu_its_ss_cannot_name():
    # vCPU 24's block is at 1 MiB: a 16-bit SS would silently become 0 (base 0x100000),
    # state VMX without unrestricted guest rejects (rmode_segment_valid) and a payload
    # reading its stack through SS gets the wrong memory
    assert L.REAL_MODE_MAX_VCPUS == 24
    with pytest.raises(ValueError, match="16-bit SS"):
        state("real", 0, L.REAL_MODE_MAX_VCPUS)


def test_machine_refuses_too_many_real_mode_vcpus_before_opening_kvm():
    p = assemble_source(";! mode: real\nhlt")
    with pytest.raises(MachineError, match="between 1 and 24 for a real-mode") as e:
        Machine(p, vcpus=25)
    assert e.value.argument == "vcpus"


@pytest.fixture
def long_memory():
    with GuestMemory(0, 0, L.system_slot_size(2), name="system") as mem:
        modes.setup_memory(mem, "long", 2, 16)
        yield mem


def test_long_mode_tss_and_io_bitmap(long_memory):
    sregs, _ = state("long", 3, 1)
    tss = long_memory.read(sregs.tr.base, sregs.tr.limit + 1)
    assert struct.unpack_from("<Q", tss, 4)[0] == L.vcpu_block(1) + L.EXC_STACK_TOP_OFF
    iopb = struct.unpack_from("<H", tss, 102)[0]
    assert iopb == L.TSS_SIZE
    # every port allowed, and the byte after the 8 KiB bitmap (read for port 0xffff's
    # second bit) is inside the limit and all ones (SDM 19.5.2)
    assert tss[iopb:iopb + 8192] == bytes(8192)
    assert sregs.tr.limit == iopb + 8192 and tss[-1] == 0xFF


def test_long_mode_gdt_idt_and_page_tables(long_memory):
    gdt = long_memory.read(L.GDT, 7 * 8)
    access = [gdt[8 * i + 5] for i in range(6)]
    flags = [gdt[8 * i + 6] >> 4 for i in range(6)]
    # P, DPL, S, type: code execute/read, data read/write, then the available 64-bit TSS
    assert access[1:] == [0x9A, 0x92, 0xFA, 0xF2, 0x89]
    assert flags[1] == flags[3] == 0xA       # G, L, not D
    for vector in range(32):
        lo, sel, ist, attr, mid, hi, _ = struct.unpack_from("<HHBBHII", long_memory.read(
            L.IDT + 16 * vector, 16))
        assert (sel, ist, attr & 0x9F) == (L.SEL_CODE0, 0, 0x8E)    # present interrupt gate
        assert attr >> 5 & 3 == (3 if vector == 3 else 0)
        assert lo | mid << 16 | hi << 32 == L.STUBS + 16 * vector
    pml4 = struct.unpack("<Q", long_memory.read(L.PML4, 8))[0]
    pde = struct.unpack("<Q", long_memory.read(L.PD_BASE, 8))[0]
    user_rw = modes.PTE_P | modes.PTE_RW | modes.PTE_US
    assert pml4 & 0xFFF == user_rw and pde & 0xFFF == user_rw | modes.PTE_PS
    assert not pde >> 63      # NX would be a reserved bit: EFER.NXE is clear


@pytest.mark.parametrize("mode,name,value", [
    ("long", "rflags", 0x3002 | 1 << 3),       # reserved bit 3
    ("long", "rflags", 0x2 | 1 << 40),         # reserved bits 63:22 (kvm_pvm keeps it)
    ("long", "rflags", 0x2 | 1 << 17),         # VM in IA-32e mode (kvm_pvm drops it)
    ("protected", "rflags", 0x2 | 1 << 17),    # VM: virtual-8086, flat segments fail
    ("real", "rflags", 0x2 | 1 << 15),
    ("protected", "rip", 1 << 32 | L.CODE),    # RIP bits 63:32 outside 64-bit code
    ("real", "rip", 1 << 32),
    ("long", "rip", 0x0000_8000_0000_0000),    # not canonical (4-level paging)
    ("long", "rip", 0x8000_0000_0001_0000),
])
def test_entry_registers_stock_vmx_refuses_are_refused(mode, name, value, monkeypatch):
    # KVM_SET_REGS only ORs in RFLAGS bit 1 (x86.c __set_regs()) and vmx_set_rflags()
    # writes the rest to the VMCS: VMX fails the VM entry (SDM vol. 3, 27.3.1.4), where
    # kvm_pvm ran the payload. Refused on every host, before KVM is opened.
    assert "VMX" in modes.entry_register_problem(mode, name, value)
    with pytest.raises(ValueError, match=f"{name} {value:#x} "):
        modes.setup_vcpu(FakeVcpu(), mode, 3 if mode == "long" else 0, 0, {name: value})
    p = assemble_source(f";! mode: {mode}\nhlt")
    monkeypatch.setenv("MINIVMM_KVM_DEVICE", "/nonexistent/kvm")   # refused before it opens
    with pytest.raises(MachineError, match=rf"regs\['{name}'\] {value:#x} .*27\.3\.1\.4") as e:
        Machine(p, regs={name: value}, kvm=None)
    assert e.value.argument == "regs"


@pytest.mark.parametrize("mode,name,value", [
    ("long", "rflags", 0x3D7FD7),        # every bit VM entry allows
    ("long", "rflags", 0),                     # bit 1: KVM sets it (x86.c __set_regs())
    ("protected", "rip", 0xFFFF_FFFF),
    ("long", "rip", 0x0000_7FFF_FFFF_F000),
    ("long", "rip", 0xFFFF_8000_0000_0000),
    ("long", "rax", 1 << 63),
    ("real", "rip", 0xFFFF),
])
def test_entry_registers_vmx_accepts_are_kept(mode, name, value):
    assert modes.entry_register_problem(mode, name, value) is None
    v = FakeVcpu()
    modes.setup_vcpu(v, mode, 3 if mode == "long" else 0, 0, {name: value})
    assert getattr(v.regs, name) == value


@pytest.mark.parametrize("rip", [0x10000, 0xFFFF_FFFF])
def test_a_real_mode_rip_past_the_code_segment_is_refused(rip, monkeypatch):
    # CS's limit is 0xffff: the first fetch raised #GP, reported at IP 0 (a 16-bit frame)
    assert "64 KiB code segment" in modes.entry_register_problem("real", "rip", rip)
    p = assemble_source(";! mode: real\nhlt")
    monkeypatch.setenv("MINIVMM_KVM_DEVICE", "/nonexistent/kvm")
    with pytest.raises(MachineError, match=rf"regs\['rip'\] {rip:#x} is beyond real mode"):
        Machine(p, regs={"rip": rip}, kvm=None)
