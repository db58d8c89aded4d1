"""Guest memory: anonymous host mappings that back KVM memory slots.

Mirrors the memory model of Documentation/virt/kvm/api.rst 4.35
KVM_SET_USER_MEMORY_REGION: a slot maps ``memory_size`` bytes of guest-physical
space at ``guest_phys_addr`` onto host virtual memory at ``userspace_addr``.
Mappings are MAP_NORESERVE, so a large sparse slot costs only what is touched.
"""
from __future__ import annotations

import ctypes
import mmap
import operator

from . import _sys
from ._args import check_number, named

PAGE_SIZE = 4096


def _index(name: str, value) -> int:
    """An int, or an integer numpy scalar (a page of a DirtyRecord's data_pages): not a
    str or float, which failed as Python's own comparison or slice errors, nor a bool,
    which read at address 1."""
    if value.__class__ is int:
        return value
    if isinstance(value, bool) or not hasattr(type(value), "__index__"):
        check_number(name, value)       # raises the TypeError naming the argument
    return operator.index(value)


class GuestMemory:
    """One anonymous mapping that backs one memory slot."""

    def __init__(self, slot: int, gpa: int, size: int, flags: int = 0, name: str = ""):
        if not isinstance(size, int) or not isinstance(gpa, int):
            raise TypeError(f"slot {slot}: size and address must be ints (got size "
                            f"{size!r}, gpa {gpa!r})")
        if size <= 0 or size % PAGE_SIZE or gpa % PAGE_SIZE or not 0 <= gpa < 1 << 52:
            raise ValueError(f"slot {slot}: size and address must be non-zero multiples of "
                             f"{PAGE_SIZE}, the address below 2**52 (got size {size:#x}, "
                             f"gpa {gpa:#x})")
        self.slot, self.gpa, self.size, self.flags = slot, gpa, size, flags
        self.name = name or f"slot{slot}"
        try:
            self.map = _sys.mmap(-1, size, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
                                 | getattr(mmap, "MAP_NORESERVE", 0x4000),
                                 mmap.PROT_READ | mmap.PROT_WRITE, 0, self._what())
        except OSError as e:
            raise MemoryError(f"cannot map {size} bytes for {self.name}: {e.strerror}") from None
        # The address KVM needs; the ctypes view pins the buffer until close().
        self._anchor = ctypes.c_char.from_buffer(self.map)
        self.host_addr = ctypes.addressof(self._anchor)

    def _what(self) -> str:
        # how --trace-ioctls labels the mapping
        named = "" if self.name == f"slot{self.slot}" else f" ({self.name})"
        return f"guest memory for slot {self.slot}{named}"

    @property
    def pages(self) -> int:
        return self.size // PAGE_SIZE

    def contains(self, gpa: int, length: int = 1) -> bool:
        gpa, length = _index("gpa", gpa), _index("length", length)
        if self.map is None:
            # not only a VM's close(): close() itself and Vm.remove_memory() unmap too
            raise ValueError(f"{self.name} is closed: its mapping was released (close(), "
                             "Vm.remove_memory() or its VM's close())")
        return length >= 0 and self.gpa <= gpa and gpa + length <= self.gpa + self.size

    def write(self, gpa: int, data: bytes) -> None:
        gpa = _index("gpa", gpa)
        try:
            view = memoryview(data)
        except TypeError:
            raise named(TypeError(f"data must be a bytes-like object, not "
                                  f"{type(data).__name__}"), "data") from None
        data = view.cast("B")    # a byte count, whatever the item size
        off = gpa - self.gpa
        if not self.contains(gpa, len(data)):
            raise ValueError(f"write of {len(data)} bytes at {gpa:#x} outside {self.name}")
        self.map[off:off + len(data)] = data

    def read(self, gpa: int, length: int) -> bytes:
        gpa, length = _index("gpa", gpa), _index("length", length)
        if not self.contains(gpa, length):
            raise ValueError(f"read of {length} bytes at {gpa:#x} outside {self.name}")
        off = gpa - self.gpa
        return self.map[off:off + length]

    def close(self) -> None:
        if self.map is not None:
            if hasattr(self, "_anchor"):
                del self._anchor
            try:
                _sys.munmap(self.map, self._what())
            except BufferError:
                raise BufferError(f"{self.name}: a view of this guest memory (a numpy array or "
                                  "memoryview) is still alive; delete it before closing") from None
            self.map = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        return f"GuestMemory(slot={self.slot}, gpa={self.gpa:#x}, size={self.size:#x})"
