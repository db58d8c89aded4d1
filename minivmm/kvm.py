"""Kvm: the /dev/kvm system file descriptor.

Mirrors the "System ioctls" of Documentation/virt/kvm/api.rst section 4:
4.1 KVM_GET_API_VERSION, 4.2 KVM_CREATE_VM, 4.4 KVM_CHECK_EXTENSION,
4.5 KVM_GET_VCPU_MMAP_SIZE, 4.46 KVM_GET_SUPPORTED_CPUID.
"""
from __future__ import annotations

import ctypes
import errno
import grp
import os
from typing import TYPE_CHECKING

from . import _sys, abi
from ._args import check_number, named
from ._sys import KvmError, KvmUnavailable, ioctl

if TYPE_CHECKING:
    from .vm import Vm


def vendor_module() -> str:
    """Which KVM vendor module is loaded: kvm_intel, kvm_amd, kvm_pvm, or 'unknown'."""
    for name in ("kvm_pvm", "kvm_intel", "kvm_amd"):
        if os.path.isdir(f"/sys/module/{name}"):
            return name
    return "unknown"


def _permission_hint(device: str) -> str:
    """What to do about an EACCES from opening ``device``, from its owner and mode."""
    try:
        st = os.stat(device)
    except OSError:
        return (f"no permission: add your user to the group owning {device} "
                "(usually 'kvm') or run as root")
    try:
        group = grp.getgrgid(st.st_gid).gr_name
    except KeyError:
        group = str(st.st_gid)
    if st.st_mode & 0o060 != 0o060:
        # joining the group would not help (a 0600 root:root /dev/kvm said to join 'root')
        return (f"no permission: {device} is mode {st.st_mode & 0o777:04o}, so members of "
                f"its group '{group}' may not open it either: run as root, or have it made "
                "0660 (a udev rule)")
    return (f"no permission: add your user to group '{group}', which owns {device}, then "
            "log in again; or run as root")


class Kvm(_sys.FdOwner):
    """An open /dev/kvm. Use as a context manager, or call close()."""

    def __init__(self, device: str | None = None):
        # an empty MINIVMM_KVM_DEVICE is unset, as an empty MINIVMM_PAYLOADS is (it opened "")
        from_env = not device and bool(os.environ.get("MINIVMM_KVM_DEVICE"))
        device = device or os.environ.get("MINIVMM_KVM_DEVICE") or "/dev/kvm"
        self.device = device

        def hint(text: str | None) -> str | None:
            # a path the user never typed on the command line: say where it came from (a
            # stale MINIVMM_KVM_DEVICE was told to modprobe, or given no hint at all)
            if not from_env:
                return text
            return (f"{text}; " if text else "") + (f"{device} is MINIVMM_KVM_DEVICE's: "
                                                    "unset it to use /dev/kvm")
        try:
            with _sys.fd_creation():
                self.fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
                self._close_fd = _sys.own_fd(self, self.fd)
        except FileNotFoundError:
            raise KvmUnavailable(f"open {device}", errno.ENOENT,
                                 hint("no KVM device: load the kvm module (modprobe kvm_intel "
                                      "or kvm_amd) or enable virtualization for this "
                                      "machine")) from None
        except PermissionError as e:
            raise KvmUnavailable(f"open {device}", e.errno,
                                 hint(_permission_hint(device))) from None
        except OSError as e:
            limit = e.errno in (errno.EMFILE, errno.ENFILE)    # many VMs open: which limit
            raise KvmUnavailable(f"open {device}", e.errno or 0,
                                 _sys._fd_limit_hint(e.errno) if limit else hint(None)
                                 ) from None
        self._cpuid = None
        try:
            try:
                version = self.get_api_version()
            except KvmError as e:
                # ENOTTY (EINVAL from some drivers): a file that is not the KVM device;
                # any other errno is KVM's own answer, given as it came
                # through hint(): MINIVMM_KVM_DEVICE is named only where the path came
                # from it (a caller's own Kvm(path) was told to check it)
                text = f"{device} does not answer KVM's ioctls: is it the KVM device?" \
                    if e.errno in (errno.ENOTTY, errno.EINVAL) else e.hint
                raise KvmUnavailable("KVM_GET_API_VERSION", e.errno, hint(text)) from None
            if version != abi.KVM_API_VERSION:
                raise KvmUnavailable("KVM_GET_API_VERSION", 0,
                                     hint(f"kernel reports API version {version}, minivmm "
                                          f"speaks {abi.KVM_API_VERSION}"))
        except BaseException:
            self.close()
            raise

    # -- lifecycle --
    def close(self) -> None:
        """Close /dev/kvm. Its VMs stay open and can still make vCPUs (each VM keeps the
        kvm_run size); system ioctls, such as capabilities asked of this object, need it open."""
        if self.fd >= 0:
            self._close_fd()
            self.fd = -1

    def __enter__(self) -> "Kvm":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- one method per ioctl --
    def get_api_version(self) -> int:
        """KVM_GET_API_VERSION: always 12 on a supported kernel (api.rst 4.1)."""
        return ioctl(self.fd, abi.KVM_GET_API_VERSION, 0, "KVM_GET_API_VERSION")

    def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION: 0 if the capability is absent, else a positive value (api.rst 4.4)."""
        return ioctl(self.fd, abi.KVM_CHECK_EXTENSION, cap, "KVM_CHECK_EXTENSION")

    def max_vcpus(self) -> int:
        """The most vCPUs a VM may have: KVM_CAP_MAX_VCPUS, else the older NR_VCPUS (api.rst 4.4)."""
        return self.check_extension(abi.KVM_CAP_MAX_VCPUS) or \
            self.check_extension(abi.KVM_CAP_NR_VCPUS) or 1

    def get_vcpu_mmap_size(self) -> int:
        """KVM_GET_VCPU_MMAP_SIZE: bytes of the kvm_run mapping, ring not included (api.rst 4.5)."""
        return ioctl(self.fd, abi.KVM_GET_VCPU_MMAP_SIZE, 0, "KVM_GET_VCPU_MMAP_SIZE")

    def get_supported_cpuid(self, max_entries: int = 256) -> ctypes.Structure:
        """KVM_GET_SUPPORTED_CPUID: the CPUID leaves KVM can offer (api.rst 4.46). Cached."""
        # a u32 (nent); -1 was ctypes' "Array length must be >= 0", 0 KVM's E2BIG
        check_number("max_entries", max_entries, 1, 2 ** 32 - 1)
        if self._cpuid is None:
            buf = abi.cpuid2_type(max_entries)()
            buf.nent = max_entries
            ioctl(self.fd, abi.KVM_GET_SUPPORTED_CPUID, ctypes.addressof(buf),
                  "KVM_GET_SUPPORTED_CPUID",
                  {errno.E2BIG: f"more than {max_entries} CPUID entries"})
            self._cpuid = buf
        return self._cpuid

    def create_vm(self, machine_type: int = 0) -> "Vm":
        """KVM_CREATE_VM: a new, empty VM (api.rst 4.2)."""
        from .vm import Vm
        # A system ioctl, asked now: the VM fd holds its own reference to the VM (api.rst 2),
        # so the VM may make vCPUs after this /dev/kvm fd is closed
        mmap_size = self.get_vcpu_mmap_size()
        with _sys.fd_creation():
            fd = ioctl(self.fd, abi.KVM_CREATE_VM, machine_type, "KVM_CREATE_VM",
                       {errno.EINVAL: "unknown machine type", errno.ENOMEM: "out of memory"})
            return Vm(self, fd, mmap_size)

    # -- conveniences built on the above --
    def caps(self, names=None) -> dict:
        """A {name: value} table of capabilities: ``names`` (KVM_CAP_* names, e.g.
        ["KVM_CAP_DIRTY_LOG_RING"]), or every one minivmm knows (None)."""
        if names is None:
            names = sorted(abi.CAP_NAMES.values())
        elif isinstance(names, str) or not hasattr(names, "__iter__"):
            # a str was taken letter by letter ("no attribute 'K'")
            raise named(TypeError("names must be a list of KVM_CAP_* names, not "
                                  f"{type(names).__name__}"), "names")
        names = list(names)
        for n in names:
            # not an AttributeError from abi, nor another constant (KVM_RUN) asked as a cap
            if not (isinstance(n, str) and n.startswith("KVM_CAP_")
                    and isinstance(getattr(abi, n, None), int)):
                raise named(ValueError(f"names: no capability named {n!r} (one of "
                                       "minivmm.abi.CAP_NAMES)"), "names")
        return {n: self.check_extension(getattr(abi, n)) for n in names}
