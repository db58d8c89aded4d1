"""The kernel UAPI mirror: structs, constants and ioctl numbers, no behaviour.

Mirrors ``include/uapi/linux/kvm.h`` and ``arch/x86/include/uapi/asm/kvm.h``;
the numbers and layouts are documented in Documentation/virt/kvm/api.rst.
"""
from .constants import *  # noqa: F401,F403
from .ioctls import *  # noqa: F401,F403
from .structs import *  # noqa: F401,F403
