"""The seccomp filter every sandboxed program runs under, compiled with libseccomp.

An allow list: the kernel runs only the system calls the interpreter, the harness and an
honest scored program make (`ALLOWED`, derived by tracing them: `python -m
soups.evaluation.sandbox.trace`); every other call fails with EPERM, whatever makes it (Python,
ctypes, native code), so a system call nobody thought of is refused, not let through.
Three calls are allowed only with safe arguments, because their other forms reach state the
sandbox shares with its siblings or the host:
- `fcntl` only to read and set descriptor flags and duplicate descriptors (no POSIX or
  open-file locks on the shared library files, no leases, no directory notifications);
- `futex` only process-private (a shared futex on a mapping of a library file would wake
  a waiter in another sandbox);
- `ioctl` fails with ENOTTY, as on a descriptor that is no terminal (the interpreter asks
  whether stdin is one; nothing else needs an ioctl).
`clone3` and `openat2` fail with ENOSYS, so glibc falls back to `clone` (refused: no threads
or processes) and `openat`. System calls of another ABI (i386 on x86_64, x32) kill the
process, as libseccomp does by default for a filter built for the native architecture.

libseccomp (`libseccomp.so.2`, on every systemd distribution) resolves names to numbers
per architecture (a name missing on one, such as `open` on aarch64, is skipped) and emits
the BPF program; bubblewrap loads it (`--seccomp FD`) right before it executes the
interpreter, so `execve` is the first call the filter sees.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import functools
import os

from soups.errors import SoupsError

ALLOW = 0x7FFF0000  # SCMP_ACT_ALLOW
SCMP_CMP_EQ, SCMP_CMP_MASKED_EQ = 4, 7

# Traced (python -m soups.evaluation.sandbox.trace, x86_64, CPython 3.11, glibc 2.36): what
# bubblewrap's init (wait4, write, exit_group), starting the interpreter, the harness and honest
# programs (the standard library, files and directories in the working directory) call.
TRACED = (
    "execve", "brk", "arch_prctl", "set_tid_address", "set_robust_list", "rseq",
    "prlimit64", "mmap", "mprotect", "munmap", "getrandom", "sysinfo", "gettid",
    "rt_sigaction", "access", "openat", "read", "write", "pread64", "lseek", "close",
    "newfstatat", "getdents64", "readlink", "mkdir", "rename", "unlink", "rmdir",
    "clock_nanosleep", "wait4", "exit_group",
    "fcntl", "futex", "ioctl",  # with the argument rules below
)
# Not in the trace, allowed on purpose: what the same calls are on other architectures and
# glibc versions, what the interpreter does on rarer paths (signals, errors, sleeping, the
# clock), and what an honest program may do in its own working directory (documented in
# docs/sandbox.md: files there, directories, renames, time). None reaches beyond the sandbox's
# own process, memory and tmpfs.
EQUIVALENTS = (
    "open", "stat", "lstat", "fstat", "statx", "faccessat", "faccessat2", "readlinkat",
    "getdents", "fcntl64", "dup", "dup2", "dup3", "pwrite64", "readv", "writev", "preadv",
    "pwritev", "mremap", "madvise", "getrlimit", "setrlimit", "ugetrlimit", "exit",
    "rt_sigprocmask", "rt_sigreturn", "sigaltstack", "restart_syscall", "kill", "tgkill",
    "tkill", "getpid", "getppid", "getuid", "geteuid", "getgid", "getegid", "getgroups",
    "getresuid", "getresgid", "getpgrp", "getpgid", "getsid", "uname", "getcwd", "chdir",
    "fchdir", "umask", "clock_gettime", "clock_getres", "gettimeofday", "time", "times",
    "getrusage", "nanosleep", "sched_yield", "sched_getaffinity", "waitid",
    "mkdirat", "unlinkat", "renameat", "renameat2", "ftruncate", "fsync", "fdatasync",
)
ALLOWED = TRACED + EQUIVALENTS

# fcntl commands allowed (everything else, locks, leases and notifications, is refused)
F_DUPFD, F_GETFD, F_SETFD, F_GETFL, F_SETFL, F_DUPFD_CLOEXEC = 0, 1, 2, 3, 4, 1030
FCNTL_COMMANDS = (F_DUPFD, F_GETFD, F_SETFD, F_GETFL, F_SETFL, F_DUPFD_CLOEXEC)
FUTEX_PRIVATE_FLAG = 128
ARGUMENT_RULES = ("fcntl", "fcntl64", "futex", "ioctl")  # not allowed unconditionally

# Refused with another error than EPERM, where a caller acts on it
ERRNO = {
    "ioctl": errno.ENOTTY,  # "not a terminal": the only ioctl anything here makes is TCGETS
    "clone3": errno.ENOSYS,  # glibc then tries clone (EPERM): threads fail cleanly
    "openat2": errno.ENOSYS,  # callers fall back to openat
}


class SeccompUnavailable(SoupsError, RuntimeError):
    """libseccomp cannot be loaded or refused to build the filter."""


def _errno_action(code: int) -> int:  # SCMP_ACT_ERRNO(code)
    return 0x00050000 | (code & 0xFFFF)


class _ArgCmp(ctypes.Structure):  # struct scmp_arg_cmp
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int), ("datum_a", ctypes.c_uint64),
                ("datum_b", ctypes.c_uint64)]


@functools.cache
def library() -> ctypes.CDLL:
    """libseccomp, its functions typed (loaded once)."""
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
    lib.seccomp_syscall_resolve_num_arch.argtypes = [ctypes.c_uint32, ctypes.c_int]
    lib.seccomp_syscall_resolve_num_arch.restype = ctypes.c_void_p  # malloc'd name
    lib.seccomp_rule_add_exact_array.argtypes = [
        ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint,
        ctypes.POINTER(_ArgCmp)]
    lib.seccomp_export_bpf.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.seccomp_release.argtypes = [ctypes.c_void_p]
    return lib


def syscall_number(name: str) -> int | None:
    """The number of system call `name` on this architecture, or None where it has none."""
    number = library().seccomp_syscall_resolve_name(name.encode())
    return number if number >= 0 else None


def syscall_names(highest: int = 1024) -> dict[int, str]:
    """number -> name of every system call libseccomp knows on this architecture."""
    lib = library()
    libc = ctypes.CDLL(None)
    libc.free.argtypes = [ctypes.c_void_p]
    names = {}
    for number in range(highest):
        pointer = lib.seccomp_syscall_resolve_num_arch(0, number)  # 0: the native arch
        if pointer:
            names[number] = ctypes.string_at(pointer).decode()
            libc.free(pointer)
    return names


def _add(lib, ctx, action: int, name: str, *conditions: tuple[int, int, int, int]) -> None:
    number = lib.seccomp_syscall_resolve_name(name.encode())
    if number < 0:  # not a system call of this architecture
        return
    array = (_ArgCmp * max(1, len(conditions)))(*(_ArgCmp(*c) for c in conditions))
    code = lib.seccomp_rule_add_exact_array(ctx, action, number, len(conditions), array)
    if code != 0:
        raise SeccompUnavailable(f"libseccomp refused the rule for {name} ({code})")


@functools.cache
def filter_program() -> bytes:
    """The compiled BPF program (struct sock_filter[]), as bubblewrap's `--seccomp` reads it."""
    lib = library()
    ctx = lib.seccomp_init(_errno_action(errno.EPERM))  # what is not allowed is refused
    if not ctx:
        raise SeccompUnavailable("seccomp_init failed")
    try:
        for name in ALLOWED:
            if name not in ARGUMENT_RULES:
                _add(lib, ctx, ALLOW, name)
        for name in ("fcntl", "fcntl64"):
            for command in FCNTL_COMMANDS:
                _add(lib, ctx, ALLOW, name, (1, SCMP_CMP_EQ, command, 0))
        _add(lib, ctx, ALLOW, "futex",
             (1, SCMP_CMP_MASKED_EQ, FUTEX_PRIVATE_FLAG, FUTEX_PRIVATE_FLAG))
        for name, code in ERRNO.items():
            _add(lib, ctx, _errno_action(code), name)
        return export(lib, ctx)
    finally:
        lib.seccomp_release(ctx)


def export(lib, ctx) -> bytes:
    """The BPF program of libseccomp context `ctx` (written by libseccomp to a pipe)."""
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
    return b"".join(chunks)
