"""KVM ioctl request numbers, computed with ioctl-opt from the struct types.

Mirrors the ``KVM_*`` ioctl definitions of ``include/uapi/linux/kvm.h``
(_IO/_IOR/_IOW/_IOWR with KVMIO = 0xAE). Each number is checked against the
system header by tests/unit/test_abi_layout.py.
"""
import ctypes

from ioctl_opt import IO, IOR, IOW, IOWR

from .constants import KVMIO
from . import structs as s

# /dev/kvm (system) ioctls
KVM_GET_API_VERSION = IO(KVMIO, 0x00)
KVM_CREATE_VM = IO(KVMIO, 0x01)
KVM_CHECK_EXTENSION = IO(KVMIO, 0x03)
KVM_GET_VCPU_MMAP_SIZE = IO(KVMIO, 0x04)
KVM_GET_SUPPORTED_CPUID = IOWR(KVMIO, 0x05, s.kvm_cpuid2)

# VM ioctls
KVM_CREATE_VCPU = IO(KVMIO, 0x41)
KVM_GET_DIRTY_LOG = IOW(KVMIO, 0x42, s.kvm_dirty_log)
KVM_SET_USER_MEMORY_REGION = IOW(KVMIO, 0x46, s.kvm_userspace_memory_region)
KVM_SET_TSS_ADDR = IO(KVMIO, 0x47)
KVM_SET_IDENTITY_MAP_ADDR = IOW(KVMIO, 0x48, ctypes.c_uint64)
KVM_ENABLE_CAP = IOW(KVMIO, 0xA3, s.kvm_enable_cap)
KVM_CLEAR_DIRTY_LOG = IOWR(KVMIO, 0xC0, s.kvm_clear_dirty_log)
KVM_RESET_DIRTY_RINGS = IO(KVMIO, 0xC7)
KVM_GET_STATS_FD = IO(KVMIO, 0xCE)

# vCPU ioctls
KVM_RUN = IO(KVMIO, 0x80)
KVM_GET_REGS = IOR(KVMIO, 0x81, s.kvm_regs)
KVM_SET_REGS = IOW(KVMIO, 0x82, s.kvm_regs)
KVM_GET_SREGS = IOR(KVMIO, 0x83, s.kvm_sregs)
KVM_SET_SREGS = IOW(KVMIO, 0x84, s.kvm_sregs)
KVM_SET_CPUID2 = IOW(KVMIO, 0x90, s.kvm_cpuid2)
KVM_SET_GUEST_DEBUG = IOW(KVMIO, 0x9B, s.kvm_guest_debug)
KVM_GET_DEBUGREGS = IOR(KVMIO, 0xA1, s.kvm_debugregs)
KVM_SET_DEBUGREGS = IOW(KVMIO, 0xA2, s.kvm_debugregs)
KVM_SET_SIGNAL_MASK = IOW(KVMIO, 0x8B, s.kvm_signal_mask)

IOCTL_NAMES = {v: k for k, v in globals().items() if k.startswith("KVM_")}
