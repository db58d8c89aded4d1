"""x86 CPU mode setup: real, 32-bit protected and 64-bit long mode.

Mirrors the register state KVM_SET_SREGS / KVM_SET_REGS accept
(arch/x86/include/uapi/asm/kvm.h ``struct kvm_sregs``) and the x86 structures
the guest CPU reads from memory (GDT, IDT, TSS, page tables; Intel SDM vol. 3).
"""
from .modes import MODES, setup_memory, setup_vcpu

__all__ = ["MODES", "setup_memory", "setup_vcpu"]
