"""minivmm: a virtual machine monitor in Python that speaks to /dev/kvm one ioctl at a time.

Not an ABI mirror itself: it re-exports the layers that are (minivmm.abi, kvm.py, vm.py,
vcpu.py) and the policy on top of them (Machine, DirtySession).

The names below load on first use (PEP 562), so that `minivmm` starts with nothing heavy
imported and a Ctrl-C while numpy, capstone and keystone load is still one line.
"""
import importlib

# Installs the vCPU kick handler now, while in the main thread: a Machine may then be made
# in any thread (only the main thread may install a signal handler)
importlib.import_module("._kick", __name__)

__version__ = "0.1.0"
__all__ = ["KvmError", "KvmUnavailable", "Kvm", "Vm", "Vcpu", "Machine", "run_payload",
           "DirtySession", "MachineError", "PayloadError", "DirtyRingError", "CollectionError"]

_HOME = {"KvmError": "._sys", "KvmUnavailable": "._sys", "Kvm": ".kvm", "Vm": ".vm",
         "Vcpu": ".vcpu", "Machine": ".machine", "run_payload": ".machine",
         "DirtySession": ".dirty.tracker", "MachineError": ".machine",
         "PayloadError": ".payload", "DirtyRingError": ".dirty.ring",
         "CollectionError": ".dirty.tracker"}


def __getattr__(name: str):
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module 'minivmm' has no attribute {name!r}")
    value = getattr(importlib.import_module(home, __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + __all__)
