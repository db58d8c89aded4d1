"""minivmm: a virtual machine monitor in Python that speaks to /dev/kvm one ioctl at a time."""
__version__ = "0.1.0"
__all__ = ["KvmError", "KvmUnavailable", "Kvm", "Vm", "Vcpu", "Machine", "run_payload",
           "DirtySession"]

from ._sys import KvmError, KvmUnavailable  # noqa: F401
from .kvm import Kvm  # noqa: F401
from .vm import Vm  # noqa: F401
from .vcpu import Vcpu  # noqa: F401
from .machine import Machine, run_payload  # noqa: F401,E402
from .dirty.tracker import DirtySession  # noqa: F401,E402
