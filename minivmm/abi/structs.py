"""ctypes mirrors of the KVM structs minivmm passes to the kernel.

Mirrors ``include/uapi/linux/kvm.h`` and ``arch/x86/include/uapi/asm/kvm.h``
(x86_64 layouts, natural alignment). Every size and offset is checked against
the system's own <linux/kvm.h> by tests/unit/test_abi_layout.py. Each class
carries ``_c_name_``, the C struct it mirrors, for that test.
"""
from __future__ import annotations

import ctypes
from ctypes import c_uint8 as u8, c_uint16 as u16, c_uint32 as u32, c_uint64 as u64

__all__ = [
    "kvm_userspace_memory_region", "kvm_regs", "kvm_segment", "kvm_dtable", "kvm_sregs",
    "kvm_enable_cap", "kvm_dirty_log", "kvm_clear_dirty_log", "kvm_dirty_gfn",
    "kvm_guest_debug_arch", "kvm_guest_debug", "kvm_debug_exit_arch", "kvm_debugregs",
    "kvm_cpuid_entry2", "kvm_cpuid2", "kvm_run", "kvm_run_io", "kvm_run_mmio", "kvm_run_fail_entry",
    "kvm_run_internal", "kvm_run_system_event", "kvm_run_debug", "kvm_run_exit_union",
    "cpuid2_type", "ALL_STRUCTS",
]


class _S(ctypes.Structure):
    _c_name_ = ""

    def __repr__(self) -> str:
        inner = ", ".join(f"{n}={getattr(self, n)!r}" for n, *_ in self._fields_
                          if not n.startswith("pad"))
        return f"{type(self).__name__}({inner})"


class kvm_userspace_memory_region(_S):
    """api.rst 4.35 KVM_SET_USER_MEMORY_REGION."""
    _c_name_ = "struct kvm_userspace_memory_region"
    _fields_ = [("slot", u32), ("flags", u32), ("guest_phys_addr", u64),
                ("memory_size", u64), ("userspace_addr", u64)]


class kvm_regs(_S):
    """api.rst 4.11 KVM_GET_REGS (x86)."""
    _c_name_ = "struct kvm_regs"
    _fields_ = [(n, u64) for n in (
        "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
        "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags")]


class kvm_segment(_S):
    _c_name_ = "struct kvm_segment"
    _fields_ = [("base", u64), ("limit", u32), ("selector", u16), ("type", u8),
                ("present", u8), ("dpl", u8), ("db", u8), ("s", u8), ("l", u8),
                ("g", u8), ("avl", u8), ("unusable", u8), ("padding", u8)]


class kvm_dtable(_S):
    _c_name_ = "struct kvm_dtable"
    _fields_ = [("base", u64), ("limit", u16), ("padding", u16 * 3)]


class kvm_sregs(_S):
    """api.rst 4.13 KVM_GET_SREGS (x86)."""
    _c_name_ = "struct kvm_sregs"
    _fields_ = [("cs", kvm_segment), ("ds", kvm_segment), ("es", kvm_segment),
                ("fs", kvm_segment), ("gs", kvm_segment), ("ss", kvm_segment),
                ("tr", kvm_segment), ("ldt", kvm_segment), ("gdt", kvm_dtable),
                ("idt", kvm_dtable), ("cr0", u64), ("cr2", u64), ("cr3", u64),
                ("cr4", u64), ("cr8", u64), ("efer", u64), ("apic_base", u64),
                ("interrupt_bitmap", u64 * 4)]


class kvm_signal_mask(_S):
    """api.rst 4.21 KVM_SET_SIGNAL_MASK: ``len`` then ``len`` bytes of sigset (a flexible
    array, so the struct itself is the 4-byte header; on x86_64 len must be 8)."""
    _c_name_ = "struct kvm_signal_mask"
    _fields_ = [("len", u32)]


class kvm_enable_cap(_S):
    """api.rst 4.37 KVM_ENABLE_CAP."""
    _c_name_ = "struct kvm_enable_cap"
    _fields_ = [("cap", u32), ("flags", u32), ("args", u64 * 4), ("pad", u8 * 64)]


class kvm_dirty_log(_S):
    """api.rst 4.8 KVM_GET_DIRTY_LOG (the bitmap pointer travels as a u64)."""
    _c_name_ = "struct kvm_dirty_log"
    _fields_ = [("slot", u32), ("padding1", u32), ("dirty_bitmap", u64)]


class kvm_clear_dirty_log(_S):
    """api.rst 4.117 KVM_CLEAR_DIRTY_LOG."""
    _c_name_ = "struct kvm_clear_dirty_log"
    _fields_ = [("slot", u32), ("num_pages", u32), ("first_page", u64), ("dirty_bitmap", u64)]


class kvm_dirty_gfn(_S):
    """One dirty-ring entry, api.rst 7.36 KVM_CAP_DIRTY_LOG_RING."""
    _c_name_ = "struct kvm_dirty_gfn"
    _fields_ = [("flags", u32), ("slot", u32), ("offset", u64)]


class kvm_guest_debug_arch(_S):
    _c_name_ = "struct kvm_guest_debug_arch"
    _fields_ = [("debugreg", u64 * 8)]


class kvm_guest_debug(_S):
    """api.rst 4.87 KVM_SET_GUEST_DEBUG."""
    _c_name_ = "struct kvm_guest_debug"
    _fields_ = [("control", u32), ("pad", u32), ("arch", kvm_guest_debug_arch)]


class kvm_debug_exit_arch(_S):
    _c_name_ = "struct kvm_debug_exit_arch"
    _fields_ = [("exception", u32), ("pad", u32), ("pc", u64), ("dr6", u64), ("dr7", u64)]


class kvm_debugregs(_S):
    """api.rst 4.33/4.34 KVM_GET/SET_DEBUGREGS: the guest's own DR0-DR3, DR6 and DR7."""
    _c_name_ = "struct kvm_debugregs"
    _fields_ = [("db", u64 * 4), ("dr6", u64), ("dr7", u64), ("flags", u64),
                ("reserved", u64 * 9)]


class kvm_cpuid_entry2(_S):
    """One CPUID entry of KVM_GET_SUPPORTED_CPUID and KVM_SET_CPUID2, as api.rst 4.46
    (KVM_GET_SUPPORTED_CPUID) lays it out; KVM_SET_CPUID2 has no section of its own."""
    _c_name_ = "struct kvm_cpuid_entry2"
    _fields_ = [("function", u32), ("index", u32), ("flags", u32), ("eax", u32),
                ("ebx", u32), ("ecx", u32), ("edx", u32), ("padding", u32 * 3)]


class kvm_cpuid2(_S):
    """Header of KVM_GET_SUPPORTED_CPUID / KVM_SET_CPUID2; entries follow it."""
    _c_name_ = "struct kvm_cpuid2"
    _fields_ = [("nent", u32), ("padding", u32)]


def cpuid2_type(nent: int) -> type:
    """A kvm_cpuid2 with room for ``nent`` trailing entries (a flexible array in C)."""
    class kvm_cpuid2_n(_S):
        _fields_ = [("nent", u32), ("padding", u32), ("entries", kvm_cpuid_entry2 * nent)]
    return kvm_cpuid2_n


# --- struct kvm_run and the members of its exit union minivmm decodes ---

class kvm_run_io(_S):
    _c_name_ = "((struct kvm_run *)0)->io"
    _fields_ = [("direction", u8), ("size", u8), ("port", u16), ("count", u32),
                ("data_offset", u64)]


class kvm_run_mmio(_S):
    _c_name_ = "((struct kvm_run *)0)->mmio"
    _fields_ = [("phys_addr", u64), ("data", u8 * 8), ("len", u32), ("is_write", u8)]


class kvm_run_fail_entry(_S):
    _c_name_ = "((struct kvm_run *)0)->fail_entry"
    _fields_ = [("hardware_entry_failure_reason", u64), ("cpu", u32)]


class kvm_run_internal(_S):
    _c_name_ = "((struct kvm_run *)0)->internal"
    _fields_ = [("suberror", u32), ("ndata", u32), ("data", u64 * 16)]


class kvm_run_system_event(_S):
    _c_name_ = "((struct kvm_run *)0)->system_event"
    _fields_ = [("type", u32), ("ndata", u32), ("data", u64 * 16)]


class kvm_run_debug(_S):
    _c_name_ = "((struct kvm_run *)0)->debug"
    _fields_ = [("arch", kvm_debug_exit_arch)]


class kvm_run_exit_union(ctypes.Union):
    _fields_ = [("io", kvm_run_io), ("mmio", kvm_run_mmio), ("fail_entry", kvm_run_fail_entry),
                ("internal", kvm_run_internal), ("system_event", kvm_run_system_event),
                ("debug", kvm_run_debug), ("padding", u8 * 256)]


class kvm_run(_S):
    """The vCPU's shared page, api.rst 5 "The kvm_run structure" (page 0 of the vCPU mmap)."""
    _c_name_ = "struct kvm_run"
    _anonymous_ = ("u",)
    _fields_ = [("request_interrupt_window", u8), ("immediate_exit", u8), ("padding1", u8 * 6),
                ("exit_reason", u32), ("ready_for_interrupt_injection", u8), ("if_flag", u8),
                ("flags", u16), ("cr8", u64), ("apic_base", u64), ("u", kvm_run_exit_union),
                ("kvm_valid_regs", u64), ("kvm_dirty_regs", u64), ("s", u8 * 2048)]


ALL_STRUCTS = [
    kvm_userspace_memory_region, kvm_regs, kvm_segment, kvm_dtable, kvm_sregs, kvm_enable_cap,
    kvm_dirty_log, kvm_clear_dirty_log, kvm_dirty_gfn, kvm_guest_debug_arch, kvm_guest_debug,
    kvm_debug_exit_arch, kvm_debugregs, kvm_cpuid_entry2, kvm_cpuid2, kvm_run, kvm_run_io,
    kvm_run_mmio, kvm_run_fail_entry, kvm_run_internal, kvm_run_system_event, kvm_run_debug,
]
