"""The kernel UAPI mirror: structs, constants and ioctl numbers, no behaviour.

Mirrors ``include/uapi/linux/kvm.h`` and ``arch/x86/include/uapi/asm/kvm.h``;
the numbers and layouts are documented in Documentation/virt/kvm/api.rst.
Everything is re-exported here, so ``abi.KVM_RUN`` or ``abi.kvm_regs`` just work.
"""
from . import constants, ioctls, structs

__all__ = []
for _module in (constants, ioctls, structs):
    for _name, _value in vars(_module).items():
        if not _name.startswith("_") and (_name.isupper() or _name.startswith("kvm_")
                                          or _name in ("cpuid2_type",)):
            globals()[_name] = _value
            __all__.append(_name)
del _module, _name, _value
