"""Real, protected and long mode: the memory the CPU reads, and the registers KVM sets.

Mirrors ``struct kvm_sregs`` / ``struct kvm_segment`` (arch/x86/include/uapi/asm/kvm.h,
api.rst 4.13 KVM_GET_SREGS) and the in-memory x86 structures of the Intel SDM vol. 3:
GDT descriptors (3.4.5), 64-bit TSS with I/O permission bitmap (7.7, 19.5.2),
64-bit interrupt gates (6.14.1), 32-bit gates (6.11), the real-mode IVT (20.1.4) and
4-level paging with 2 MiB pages (4.5).

Why long mode runs at CPL3 by default: on kvm_pvm hosts CPL0 code is emulated
one instruction at a time; CPL3 code runs natively (host-probes.md, abi.md 6).
CPL3 port I/O needs the TSS I/O bitmap (kvm_pvm ignores IOPL; IOPL=3 is set too,
for VMX/SVM hosts), and exceptions from CPL3 need RSP0 in that TSS.
"""
from __future__ import annotations

import struct

from .. import abi
from . import layout as L

MODES = ("real", "protected", "long")

CR0_PE, CR0_MP, CR0_ET, CR0_NE, CR0_WP, CR0_PG = 1, 2, 0x10, 0x20, 1 << 16, 1 << 31
CR4_PAE, CR4_OSFXSR, CR4_OSXMMEXCPT = 1 << 5, 1 << 9, 1 << 10
EFER_LME, EFER_LMA = 1 << 8, 1 << 10
PTE_P, PTE_RW, PTE_US, PTE_PS = 1, 2, 4, 0x80

# Vectors for which the CPU pushes an error code (SDM vol. 3, table 6-1).
ERROR_CODE_VECTORS = {8, 10, 11, 12, 13, 14, 17, 21, 29, 30}
EXCEPTION_NAMES = {
    0: "#DE divide error", 1: "#DB debug", 2: "NMI", 3: "#BP breakpoint", 4: "#OF overflow",
    5: "#BR bound range", 6: "#UD invalid opcode", 7: "#NM device not available",
    8: "#DF double fault", 10: "#TS invalid TSS", 11: "#NP segment not present",
    12: "#SS stack fault", 13: "#GP general protection", 14: "#PF page fault",
    16: "#MF x87 error", 17: "#AC alignment check", 18: "#MC machine check",
    19: "#XM SIMD exception", 20: "#VE virtualization", 21: "#CP control protection",
}


def pushes_error_code(vector: int, mode: str) -> bool:
    """Whether the CPU pushes an error code for ``vector`` in ``mode``: never in real mode,
    where an interrupt pushes only FLAGS, CS and IP; elsewhere the stub pushes a 0
    of its own for the vectors without one."""
    return vector in ERROR_CODE_VECTORS and mode != "real"


# The shared part of the exception stubs, the same code at each mode's word size W
# (8, 4 or 2 bytes; CPL0). On entry the stack holds vector, error code, then the CPU's
# frame. It reports the vector on port 0xe0; the host reads the frame at the stack
# pointer. The host's answer to `in eax, 0xe0` is 0 (stay halted) or 1 (resume).
#     push rax / eax / ax
#     mov eax, [rsp+W]          ; the vector (16-bit: an address-size prefix for [esp+2])
#     out 0xe0, eax
#     in eax, 0xe0
#     test eax, eax
#     jz .stop
#     pop rax / eax / ax
#     add rsp, 2*W              ; drop vector and error code (REX.W in long mode)
#     iretq / iretd / iret
# .stop: hlt
#     jmp .stop
def _stub_common_code(word: int) -> bytes:
    rex = "48" if word == 8 else ""
    skip = 5 + (2 if rex else 0)        # jz over pop, add and iret (and their REX.W)
    return bytes.fromhex(
        "50" + ("67" if word == 2 else "") + f"8b4424{word:02x}" + "e7e0" "e5e0" "85c0"
        + f"74{skip:02x}" + "58" + rex + f"83c4{2 * word:02x}" + rex + "cf" + "f4" "ebfd")


STUB_COMMON_CODE = _stub_common_code(8)
# The stubs' code ends here: the per-vector stubs from L.STUBS, then the common part
STUB_END = L.STUB_COMMON + len(STUB_COMMON_CODE)
# After `push rax` the frame is: rax, vector, error, rip, cs, rflags, rsp, ss.
STUB_FRAME_FIELDS = ("rax", "vector", "error_code", "rip", "cs", "rflags", "rsp", "ss")

# The same stubs for 32-bit protected mode (flat, CPL0: IDT of 8-byte interrupt gates) and
# real mode (IVT at 0: offset, segment 0). Same per-vector code (push imm8 is 4 or 2
# bytes there, jmp rel32 or rel16), the common part at that word size. Their frame after
# `push eax`/`push ax`: eax, vector, error (0 in real mode), eip, cs, eflags: no stack
# switch at one privilege level.
_COMMON = {"long": STUB_COMMON_CODE, "protected": _stub_common_code(4),
           "real": _stub_common_code(2)}
STUB_FRAME_LAYOUT = {"long": ("<8Q", STUB_FRAME_FIELDS),
                     "protected": ("<6I", STUB_FRAME_FIELDS[:6]),
                     "real": ("<6H", STUB_FRAME_FIELDS[:6])}
EFLAGS_FIXED1 = 0x2     # RFLAGS bit 1 reads as 1 in every flags image the CPU pushes


def cpu_pushed_frame(mode: str, frame: dict) -> bool:
    """Whether the CPU could have pushed this stub frame's CS and flags. Long mode: one of
    minivmm's code selectors. Protected mode (CPL0; a payload may load its own GDT): a
    non-null selector with RPL 0. Real mode: any segment (a payload's far jump or its
    own code anywhere), so only the flags image tells: its bit 1 is always set."""
    if mode == "long":
        return frame["cs"] in (L.SEL_CODE0, L.SEL_CODE3)
    if not frame["rflags"] & EFLAGS_FIXED1:
        return False
    if mode == "protected":
        return frame["cs"] & 0xFFFC != 0 and frame["cs"] & 3 == 0
    return True


def stub_end(mode: str) -> int:
    """Where the exception stubs' code ends in ``mode``."""
    return L.STUB_COMMON + len(_COMMON[mode])


def _stub(vector: int, mode: str = "long") -> bytes:
    no_error = not pushes_error_code(vector, mode)
    code = b"\x6a\x00" if no_error else b""                          # push 0
    code += bytes((0x6A, vector))                                   # push vector
    rel = "<h" if mode == "real" else "<i"                          # jmp rel16 / rel32
    here = L.STUBS + 16 * vector + len(code) + 1 + struct.calcsize(rel)
    code += b"\xe9" + struct.pack(rel, L.STUB_COMMON - here)        # jmp common
    return code.ljust(16, b"\xcc")


def _gate32(offset: int) -> bytes:
    """An 8-byte 32-bit interrupt gate to a CPL0 handler (SDM 6.11)."""
    return struct.pack("<HHBBH", offset & 0xFFFF, 0x08, 0, 0x8E, offset >> 16)


def _descriptor(base: int, limit: int, access: int, flags: int) -> bytes:
    """An 8-byte GDT code/data descriptor (SDM 3.4.5)."""
    return struct.pack("<HHBBBB", limit & 0xFFFF, base & 0xFFFF, (base >> 16) & 0xFF, access,
                       ((limit >> 16) & 0xF) | (flags << 4), (base >> 24) & 0xFF)


def _tss_descriptor(base: int, limit: int) -> bytes:
    """A 16-byte 64-bit TSS descriptor, type 9 (available), present."""
    low = _descriptor(base, limit, 0x89, 0)
    return low + struct.pack("<II", base >> 32, 0)


def _gate(offset: int, dpl: int) -> bytes:
    """A 16-byte 64-bit interrupt gate to a CPL0 handler (SDM 6.14.1)."""
    return struct.pack("<HHBBHII", offset & 0xFFFF, L.SEL_CODE0, 0, 0x8E | (dpl << 5),
                       (offset >> 16) & 0xFFFF, offset >> 32, 0)


def gdt_bytes(mode: str) -> bytes:
    null = bytes(8)
    if mode == "protected":
        return null + _descriptor(0, 0xFFFFF, 0x9A, 0xC) + _descriptor(0, 0xFFFFF, 0x92, 0xC)
    return (null
            + _descriptor(0, 0xFFFFF, 0x9A, 0xA)     # 0x08 64-bit code, DPL0
            + _descriptor(0, 0xFFFFF, 0x92, 0xC)     # 0x10 data, DPL0
            + _descriptor(0, 0xFFFFF, 0xFA, 0xA)     # 0x18 64-bit code, DPL3
            + _descriptor(0, 0xFFFFF, 0xF2, 0xC)     # 0x20 data, DPL3
            + _tss_descriptor(L.vcpu_block(0) + L.TSS_OFF, L.TSS_SIZE + L.IOBITMAP_BYTES))


def setup_memory(mem, mode: str, vcpus: int, data_pages: int) -> None:
    """Write GDT, exception stubs and their IDT (an IVT at 0 in real mode), and for long
    mode page tables and per-vCPU TSSes, into slot 0."""
    mem.write(L.GDT, gdt_bytes(mode))
    if mode != "long":
        if mode == "real":      # IVT entries: offset, segment 0
            mem.write(0, b"".join(struct.pack("<HH", L.STUBS + 16 * v, 0) for v in range(32)))
        else:
            mem.write(L.IDT, b"".join(_gate32(L.STUBS + 16 * v) for v in range(32)))
        mem.write(L.STUBS, b"".join(_stub(v, mode) for v in range(32)))
        mem.write(L.STUB_COMMON, _COMMON[mode])
        return
    ngib = L.mapped_gib(data_pages)
    if ngib > L.PD_MAX:
        raise ValueError(f"data slot too large: at most {L.MAX_DATA_PAGES} pages")
    flags = PTE_P | PTE_RW | PTE_US     # user-accessible: payloads run at CPL3
    mem.write(L.PML4, struct.pack("<Q", L.PDPT | flags))
    mem.write(L.PDPT, struct.pack(f"<{ngib}Q", *((L.PD_BASE + g * L.PAGE) | flags
                                                for g in range(ngib))))
    for g in range(ngib):
        entries = ((g * L.GIB + i * L.MIB2) | flags | PTE_PS for i in range(512))
        mem.write(L.PD_BASE + g * L.PAGE, struct.pack("<512Q", *entries))
    # IDT: 32 exception gates; #BP gets DPL3 so `int3` behaves the same on VMX/SVM.
    mem.write(L.IDT, b"".join(_gate(L.STUBS + 16 * v, 3 if v == 3 else 0) for v in range(32)))
    mem.write(L.STUBS, b"".join(_stub(v) for v in range(32)))
    mem.write(L.STUB_COMMON, STUB_COMMON_CODE)
    for i in range(vcpus):
        block = L.vcpu_block(i)
        tss = bytearray(L.TSS_SIZE)
        struct.pack_into("<Q", tss, 4, block + L.EXC_STACK_TOP_OFF)     # RSP0
        struct.pack_into("<H", tss, 102, L.TSS_SIZE)                    # I/O bitmap offset
        # All-zero bitmap = every port allowed, then the required 0xff terminator.
        mem.write(block + L.TSS_OFF, bytes(tss) + bytes(L.IOBITMAP_BYTES) + b"\xff")


# RFLAGS bits VM entry refuses (SDM vol. 3, 27.3.1.4 "Checks on Guest RIP, RFLAGS, and
# SSP"): reserved 3, 5, 15 and 22-63 must be 0, and VM (17) must be 0 in long and real
# mode; in protected mode it would enter virtual-8086 mode, whose segment checks (27.3.1.2:
# base = selector << 4, limit 0xffff) minivmm's flat segments fail. kvm_pvm takes them
# (keeps bit 40, drops VM), but KVM_SET_REGS only ORs in bit 1 (x86.c __set_regs()) and
# vmx_set_rflags() writes the rest to the VMCS: stock VMX ends the first KVM_RUN in
# KVM_EXIT_FAIL_ENTRY (reason 0x80000021, invalid guest state).
RFLAGS_REFUSED = ((1 << 64) - (1 << 22)) | 1 << 17 | 1 << 15 | 1 << 5 | 1 << 3


def entry_register_problem(mode: str, name: str, value: int) -> str | None:
    """Why stock VMX would refuse ``value`` for entry register ``name`` in ``mode``
    (KVM_SET_REGS takes it without a word), or None."""
    if name == "rflags" and value & RFLAGS_REFUSED:
        return (f"sets reserved or VM bits ({value & RFLAGS_REFUSED:#x}): VM entry on Intel "
                "VMX fails with them (SDM vol. 3, 27.3.1.4)")
    if name == "rip" and mode == "real" and 0xFFFF < value < 1 << 32:
        # not a VM-entry rule: CS's limit is 0xffff, so the first fetch raises #GP, whose
        # real-mode frame keeps 16 bits of IP (it was reported at IP 0, the wrong line)
        return ("is beyond real mode's 64 KiB code segment (CS limit 0xffff): its first "
                "fetch would raise #GP")
    if name == "rip" and mode != "long" and value >> 32:
        return (f"is beyond 32 bits in {mode} mode: VM entry on Intel VMX fails (SDM vol. 3, "
                "27.3.1.4: RIP bits 63:32 are 0 outside 64-bit code)")
    if name == "rip" and mode == "long" and (value >> 47) not in (0, (1 << 17) - 1):
        # 4-level paging (CR4.LA57 = 0): not canonical, so no instruction there can run;
        # VMX fails the entry itself on CPUs without 5-level paging, others raise #GP
        return ("is not a canonical 48-bit address: VM entry on Intel VMX fails (SDM vol. 3, "
                "27.3.1.4), elsewhere its first fetch raises #GP")
    return None


def _seg(selector, base=0, limit=0xFFFFFFFF, type_=3, dpl=0, db=0, s=1, l_=0, g=1):
    return abi.kvm_segment(base=base, limit=limit, selector=selector, type=type_, present=1,
                           dpl=dpl, db=db, s=s, l=l_, g=g)


def setup_vcpu(vcpu, mode: str, cpl: int, index: int, regs_init: dict) -> None:
    """Set special and general registers so the vCPU starts the payload in ``mode``."""
    sregs = vcpu.get_sregs()
    regs = abi.kvm_regs()
    block = L.vcpu_block(index)
    stack_top = block + L.USER_STACK_TOP_OFF
    if mode == "real":
        # CS = DS = ES = 0x1000 (base 0x10000, where the payload is); SS:SP = own stack.
        if index >= L.REAL_MODE_MAX_VCPUS:      # ctypes would cut SS to 16 bits silently
            raise ValueError(f"real mode: vCPU {index}'s stack at {block:#x} is beyond "
                             "what a 16-bit SS selector names")
        code_seg = L.CODE >> 4
        for name in ("cs", "ds", "es", "fs", "gs"):
            seg = getattr(sregs, name)
            seg.selector, seg.base = code_seg, L.CODE
        sregs.ss.selector, sregs.ss.base = block >> 4, block
        sregs.idt.base, sregs.idt.limit = 0, 0x3FF           # the IVT (stubs for 0-31)
        regs.rip, regs.rsp, regs.rflags = 0, L.USER_STACK_TOP_OFF, 0x2
    elif mode == "protected":
        sregs.cs = _seg(0x08, type_=11, db=1)
        for name in ("ds", "es", "fs", "gs", "ss"):
            setattr(sregs, name, _seg(0x10, db=1))
        sregs.tr = _seg(0, limit=0x67, type_=11, s=0, g=0)
        sregs.gdt.base, sregs.gdt.limit = L.GDT, 3 * 8 - 1
        sregs.idt.base, sregs.idt.limit = L.IDT, 32 * 8 - 1
        sregs.cr0 = CR0_PE | CR0_ET | CR0_NE
        regs.rip, regs.rsp, regs.rflags = L.CODE, stack_top, 0x2
    elif mode == "long":
        if cpl == 3:
            sregs.cs = _seg(L.SEL_CODE3, type_=11, dpl=3, l_=1)
            data = _seg(L.SEL_DATA3, dpl=3, db=1)
            rflags = 0x3002            # IOPL=3 for VMX/SVM; kvm_pvm uses the I/O bitmap
        else:
            sregs.cs = _seg(L.SEL_CODE0, type_=11, l_=1)
            data = _seg(L.SEL_DATA0, db=1)
            rflags = 0x2
        for name in ("ds", "es", "fs", "gs", "ss"):
            setattr(sregs, name, data)
        sregs.tr = _seg(L.SEL_TSS, base=block + L.TSS_OFF, limit=L.TSS_SIZE + L.IOBITMAP_BYTES,
                        type_=11, s=0, g=0)
        sregs.gdt.base, sregs.gdt.limit = L.GDT, 7 * 8 - 1
        sregs.idt.base, sregs.idt.limit = L.IDT, 32 * 16 - 1
        sregs.cr3 = L.PML4
        sregs.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT
        sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG
        sregs.efer = EFER_LME | EFER_LMA
        regs.rip, regs.rsp, regs.rflags = L.CODE, stack_top, rflags
    else:
        raise ValueError(f"unknown mode {mode!r}")
    for name, value in regs_init.items():
        problem = entry_register_problem(mode, name, value)
        if problem:
            raise ValueError(f"{name} {value:#x} {problem}")
        setattr(regs, name, value)
    vcpu.set_sregs(sregs)
    vcpu.set_regs(regs)
