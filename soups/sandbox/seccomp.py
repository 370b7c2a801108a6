"""The seccomp filter every sandboxed program runs under, compiled with libseccomp.

A deny list over the namespaces bubblewrap already sets up: the kernel refuses, whatever
the program does (Python, ctypes, native code), the system calls that create processes,
reach other processes, open sockets or anonymous memory outside the memory limit, change
mounts or namespaces, or expose kernel attack surface (bpf, io_uring, perf, keyrings,
modules). Refused calls fail with EPERM, so a program sees an ordinary Python error;
system calls of another architecture (i386 on x86_64, x32) kill the process, as
libseccomp does by default for a filter built for the native architecture only.

libseccomp (`libseccomp.so.2`, on every systemd distribution) resolves names to numbers
per architecture and emits the BPF program; bubblewrap loads it (`--seccomp FD`) right
before it starts the interpreter.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import functools
import os

from soups.errors import SoupsError

ALLOW = 0x7FFF0000  # SCMP_ACT_ALLOW

# Each refused with EPERM. Names missing on an architecture (fork on aarch64) are skipped.
DENIED = (
    # new processes and threads (a scored function needs neither), and other processes
    "fork", "vfork", "clone", "clone3", "ptrace", "process_vm_readv", "process_vm_writev",
    "process_madvise", "kcmp", "pidfd_open", "pidfd_getfd", "pidfd_send_signal",
    # network and local IPC (the network namespace has only a loopback, this closes it too)
    "socket", "socketpair", "mq_open", "msgget", "semget", "shmget",
    # memory that RLIMIT_AS does not count, and files that bypass the tmpfs size limit
    "memfd_create", "memfd_secret", "userfaultfd", "mknod", "mknodat",
    # mounts, namespaces, root changes
    "mount", "umount2", "pivot_root", "chroot", "unshare", "setns", "open_tree", "move_mount",
    "fsopen", "fsconfig", "fsmount", "fspick", "mount_setattr",
    "name_to_handle_at", "open_by_handle_at",
    # kernel attack surface a scored program has no use for
    "bpf", "perf_event_open", "io_uring_setup", "io_uring_enter", "io_uring_register",
    "keyctl", "add_key", "request_key", "kexec_load", "kexec_file_load", "init_module",
    "finit_module", "delete_module", "reboot", "swapon", "swapoff", "acct", "quotactl",
    "quotactl_fd", "syslog", "personality", "uselib", "vhangup", "iopl", "ioperm",
    "lookup_dcookie", "fanotify_init", "settimeofday", "clock_settime", "clock_adjtime",
    "adjtimex",
)


class SeccompUnavailable(SoupsError, RuntimeError):
    """libseccomp cannot be loaded or refused to build the filter."""


def _errno_action(code: int) -> int:  # SCMP_ACT_ERRNO(code)
    return 0x00050000 | (code & 0xFFFF)


def _library() -> ctypes.CDLL:
    name = ctypes.util.find_library("seccomp") or "libseccomp.so.2"
    try:
        lib = ctypes.CDLL(name, use_errno=True)
    except OSError as err:
        raise SeccompUnavailable(f"libseccomp is not installed ({err}); install it with "
                                 "`apt-get install libseccomp2` (Debian/Ubuntu) or "
                                 "`dnf install libseccomp` (Fedora/RHEL)") from None
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_rule_add_exact.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int,
                                           ctypes.c_uint]
    lib.seccomp_export_bpf.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.seccomp_release.argtypes = [ctypes.c_void_p]
    return lib


@functools.cache
def filter_program() -> bytes:
    """The compiled BPF program (struct sock_filter[]), as bubblewrap's `--seccomp` reads it."""
    lib = _library()
    ctx = lib.seccomp_init(ALLOW)
    if not ctx:
        raise SeccompUnavailable("seccomp_init failed")
    try:
        for name in DENIED:
            number = lib.seccomp_syscall_resolve_name(name.encode())
            if number < 0:  # not a system call of this architecture
                continue
            code = lib.seccomp_rule_add_exact(ctx, _errno_action(errno.EPERM), number, 0)
            if code != 0:
                raise SeccompUnavailable(f"libseccomp refused the rule for {name} ({code})")
        read_fd, write_fd = os.pipe()
        try:
            code = lib.seccomp_export_bpf(ctx, write_fd)
            os.close(write_fd)
            write_fd = -1
            if code != 0:
                raise SeccompUnavailable(f"seccomp_export_bpf failed ({code})")
            chunks = []
            while chunk := os.read(read_fd, 65536):
                chunks.append(chunk)
        finally:
            if write_fd >= 0:
                os.close(write_fd)
            os.close(read_fd)
    finally:
        lib.seccomp_release(ctx)
    return b"".join(chunks)
