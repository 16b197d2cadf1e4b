"""Keep a root-run process sandbox out of the run directories when it cannot drop to uid 65534.

As root, the process sandbox prefers to run the pipeline as 65534 (a 0700 run
directory is then out of its reach). When that user cannot even run the
interpreter (a Python under /root, as pyenv installs it), the child instead:
enters a private mount namespace, covers each given folder with an empty
read-only tmpfs of mode 0000, then drops every capability for good
(securebits NOROOT + locks, an empty bounding set, no_new_privs). Still uid 0
but without CAP_SYS_ADMIN it cannot unmount the covers, and without
CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH a 0000 folder is closed to it.

``confiner(paths)`` looks everything up in the parent (no dlopen after fork)
and returns the function the child calls in ``preexec_fn``.
"""

from __future__ import annotations

import ctypes
import os
from typing import Callable

CLONE_NEWNS = 0x00020000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REC, MS_PRIVATE = 0x4000, 1 << 18
PR_CAPBSET_DROP, PR_SET_SECUREBITS, PR_SET_NO_NEW_PRIVS = 24, 28, 38
SECURE_ALL_BUT_KEEP_CAPS = 0x2F
"""NOROOT, NO_SETUID_FIXUP and KEEP_CAPS_LOCKED, each with its lock: exec never grants root its capabilities again."""
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
LAST_CAP = 63


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def confiner(paths: list[str]) -> Callable[[], None]:
    """A child-side function: private mounts, ``paths`` covered (mode 0000, read-only), all capabilities dropped."""
    libc = ctypes.CDLL(None, use_errno=True)
    unshare, mount, prctl, capset = libc.unshare, libc.mount, libc.prctl, libc.capset
    encoded = [os.fsencode(p) for p in paths]
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()

    def check(rc: int, what: str) -> None:
        if rc != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"sandbox confinement: {what}: {os.strerror(err)}")

    def confine() -> None:
        check(unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
        check(mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None), "make mounts private")
        for p in encoded:
            check(mount(b"tmpfs", p, b"tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, b"size=4k,mode=0000"),
                  f"cover {os.fsdecode(p)}")
        check(prctl(PR_SET_SECUREBITS, SECURE_ALL_BUT_KEEP_CAPS, 0, 0, 0), "securebits")
        for cap in range(LAST_CAP + 1):
            prctl(PR_CAPBSET_DROP, cap, 0, 0, 0)  # EINVAL past the kernel's last capability: fine
        check(prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
        check(capset(ctypes.byref(header), data), "capset (drop all)")

    return confine
