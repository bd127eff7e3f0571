"""The few calls that differ between Linux, macOS and Windows, each behind one function.

Linux keeps the calls it always made; the other platforms get the nearest portable equivalent, or a documented
no-op where none exists. No torch at import: it is imported inside the functions that need it.
"""

from __future__ import annotations

import os
import sys

_IS_WINDOWS = sys.platform == "win32"

# Windows constants (winnt.h, minwinbase.h, winerror.h)
_PROCESS_QUERY_LIMITED_INFORMATION = 0x1000
_STILL_ACTIVE = 259
_ERROR_ACCESS_DENIED = 5


def process_alive(pid: int) -> bool:
    """Whether a process with this pid exists (a zombie not yet reaped by its parent still counts on POSIX).

    POSIX: signal 0, which checks without delivering anything. Windows never uses os.kill: there
    os.kill(pid, 0) sends CTRL_C_EVENT to the process's console group. It opens the process instead and reads
    its exit code (a process that exited with code 259, STILL_ACTIVE, reads as alive). pid <= 0 names a
    process group on POSIX, not a process: False.
    """
    if pid <= 0:
        return False
    if _IS_WINDOWS:
        return _windows_process_alive(pid)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by another user
        return True
    return True


def _windows_process_alive(pid: int) -> bool:
    import ctypes
    from ctypes import wintypes

    kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)
    kernel32.OpenProcess.argtypes = (wintypes.DWORD, wintypes.BOOL, wintypes.DWORD)
    kernel32.OpenProcess.restype = wintypes.HANDLE  # pointer-sized: the default int would truncate it
    kernel32.GetExitCodeProcess.argtypes = (wintypes.HANDLE, ctypes.POINTER(wintypes.DWORD))
    kernel32.GetExitCodeProcess.restype = wintypes.BOOL
    kernel32.CloseHandle.argtypes = (wintypes.HANDLE,)
    handle = kernel32.OpenProcess(_PROCESS_QUERY_LIMITED_INFORMATION, False, pid)
    if not handle:
        # Access denied: it exists (as PermissionError on POSIX). Anything else (invalid parameter): no such pid.
        return ctypes.get_last_error() == _ERROR_ACCESS_DENIED
    try:
        code = wintypes.DWORD()
        if not kernel32.GetExitCodeProcess(handle, ctypes.byref(code)):
            return True  # it could be opened, so it exists; its state is unknown
        return code.value == _STILL_ACTIVE
    finally:
        kernel32.CloseHandle(handle)


def temp_root() -> str | None:
    """Where the pool's temporary folder goes: /dev/shm when it exists and is writable (on Linux a file there is
    RAM that the workers map), else None (tempfile's default folder)."""
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


_LINUX_STATUS = "/proc/self/status"
_LINUX_CLEAR_REFS = "/proc/self/clear_refs"


def _linux_peak_rss() -> int | None:
    """VmHWM: this process's own peak resident set, in bytes (Linux). Unlike ru_maxrss, which a process started
    by a large parent inherits across exec (a pool worker would report its host's peak), VmHWM starts afresh
    with the process's address space and can be reset."""
    try:
        with open(_LINUX_STATUS) as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def peak_memory_bytes(device) -> int:
    """Peak memory in bytes on `device` (a torch.device or a string such as "cuda:1" or "cpu"), since the last
    reset_peak_memory.

    CUDA: the most torch has allocated on that device. CPU: the process's peak resident set (everything the
    process holds, not just tensors): Linux's VmHWM (resettable); elsewhere ru_maxrss (macOS) or the peak
    working set (Windows, with psutil; else 0), which cannot be reset.
    """
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    if _IS_WINDOWS:
        try:
            import psutil
        except ImportError:
            return 0
        return psutil.Process().memory_info().peak_wset
    peak = _linux_peak_rss()
    if peak is not None:
        return peak
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS reports bytes, Linux KiB


def reset_peak_memory(device) -> None:
    """Starts a new peak for peak_memory_bytes: CUDA's counter; on Linux also the CPU's (VmHWM drops to what the
    process holds now). Elsewhere the CPU figure is the process's peak so far."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    elif os.path.exists(_LINUX_CLEAR_REFS):
        try:
            with open(_LINUX_CLEAR_REFS, "w") as clear:
                clear.write("5")  # resets the peak resident set (proc(5): clear_refs)
        except OSError:
            pass


def cpu_cores() -> list[int]:
    """The CPU cores this process may run on, sorted: its affinity where the platform reports one (Linux), else
    every core."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def pin_to_cores(cores) -> None:
    """Restricts the calling process to these cores where the platform can (Linux); elsewhere does nothing."""
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {int(c) for c in cores})

