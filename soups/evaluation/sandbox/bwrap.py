"""The bubblewrap command line of one sandboxed program.

Namespaces: user (the program is uid/gid 65534 inside, with no capabilities and no way to
make further user namespaces), pid (it sees only itself; everything dies with the sandbox),
network (a loopback only; sockets are refused by the seccomp filter anyway), ipc, uts,
cgroup, mount. The mount namespace holds only, read-only: the shared libraries of the
system (`/usr/lib`, `/lib*`), the interpreter, its standard library and the directory of
`libpython`, with every site-packages folder masked by an empty read-only tmpfs; and one
writable tmpfs of bounded size as the working directory. No `/proc`, no `/dev`, no `/etc` (but the
loader cache), no home, no project files, no datasets. The root itself is remounted
read-only.
"""

from __future__ import annotations

import functools
import glob
import os
import shutil
import sys
import sysconfig

SANDBOX_UID = 65534
WORK_DIR = "/tmp"
BWRAP_PATHS = ("/usr/bin/bwrap", "/bin/bwrap", "/usr/local/bin/bwrap")
SYSTEM_LIBS = ("/usr/lib", "/usr/lib64", "/usr/lib32", "/lib", "/lib64", "/lib32")
INTERPRETER_FLAGS = ("-I", "-S", "-B", "-X", "utf8")  # isolated, no site, no bytecode


def find_bwrap() -> str | None:
    """bubblewrap's executable: a system location first (PATH can be anyone's), then PATH."""
    for path in BWRAP_PATHS:
        if os.access(path, os.X_OK):
            return path
    return shutil.which("bwrap")


def interpreter() -> str:
    """The real interpreter binary behind this (maybe virtual-env) Python."""
    return os.path.realpath(sys.executable)


def _under(path: str, roots) -> bool:
    return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)


@functools.cache
def mount_args() -> tuple[str, ...]:
    """bwrap options that build the sandbox's file system view (cached: they do not change
    while this process lives)."""
    args: list[str] = []
    bound: list[str] = []
    for path in SYSTEM_LIBS:
        if os.path.islink(path):
            args += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            args += ["--ro-bind", path, path]
            bound.append(path)
    if os.path.isfile("/etc/ld.so.cache"):  # where the dynamic loader finds libraries
        args += ["--ro-bind", "/etc/ld.so.cache", "/etc/ld.so.cache"]
    base = {"base": sys.base_prefix, "platbase": sys.base_exec_prefix}
    paths = sysconfig.get_paths(vars=base)
    wanted = [paths["stdlib"], paths["platstdlib"]]
    libdir = sysconfig.get_config_var("LIBDIR")
    if libdir and sysconfig.get_config_var("Py_ENABLE_SHARED"):
        wanted.append(libdir)  # libpython (and, in conda, the libraries it ships)
    for path in sorted({os.path.realpath(p) for p in wanted if p and os.path.isdir(p)}):
        if not _under(path, bound):
            args += ["--ro-bind", path, path]
            bound.append(path)
    exe = interpreter()
    if not _under(exe, bound):
        args += ["--ro-bind", exe, exe]
    masks = {os.path.realpath(p) for p in (paths["purelib"], paths["platlib"])}
    for root in bound:
        masks.update(glob.glob(os.path.join(root, "python3*", "*-packages")))
        masks.update(glob.glob(os.path.join(root, "python3", "dist-packages")))
    for path in sorted(masks):
        if os.path.isdir(path) and _under(path, bound):
            # Read-only too: `--remount-ro /` does not reach mounts below the root, and an
            # empty writable tmpfs would be memory outside every limit the sandbox sets.
            args += ["--tmpfs", path, "--remount-ro", path]
    return tuple(args)


def command(bwrap: str, harness: str, result_fd: int, seccomp_fd: int, info_fd: int,
            tmp_mb: int) -> list[str]:
    """The full command: bwrap, its options, then the interpreter running `harness`."""
    return [
        bwrap, "--unshare-all", "--unshare-user", "--disable-userns", "--die-with-parent",
        "--new-session", "--cap-drop", "ALL", "--clearenv", "--hostname", "sandbox",
        "--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_UID),
        *mount_args(),
        "--size", str(tmp_mb << 20), "--tmpfs", WORK_DIR, "--chdir", WORK_DIR,
        "--remount-ro", "/",
        "--seccomp", str(seccomp_fd), "--info-fd", str(info_fd),
        "--", interpreter(), *INTERPRETER_FLAGS, "-c", harness, str(result_fd),
    ]
