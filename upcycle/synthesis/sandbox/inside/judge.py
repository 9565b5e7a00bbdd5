"""The judge: PID 1 of the sandbox. Drops its identity, forks the program's process, reads the
task, runs the tests against the program's answers and writes the report (package docstring)."""

from __future__ import annotations

import builtins
import json
import os
import signal
import sys
import time

from .program import serve
from .wire import (
    ERROR_CHARS,
    HEADER,
    Channel,
    ProgramError,
    ProgramGone,
    ProtocolError,
    decode,
    describe,
    encode,
    recv,
    send,
)


def _become_undumpable(uid_changed: bool) -> None:
    """Package docstring, step 1."""
    if uid_changed:
        with open("/proc/sys/fs/suid_dumpable") as f:
            if f.read().strip() == "0":
                return  # the kernel did it on the uid change
    import ctypes

    if ctypes.CDLL(None, use_errno=True).prctl(4, 0, 0, 0, 0) != 0:  # PR_SET_DUMPABLE
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_DUMPABLE, 0) failed")


class Remote:
    """An object of the program, seen from the judge: calls, attributes, iteration, len() and
    indexing are asked of the program and answered with plain values or more `Remote`s. What
    would let the program decide a verdict (==, <, bool(), hash()) is refused."""

    __slots__ = ("_handle", "_kind")

    def __init__(self, handle: int, kind: str):
        self._handle, self._kind = handle, kind

    def __call__(self, *args, **kwargs):
        return _ask(op="call", h=self._handle, args=encode(list(args), _handle_of),
                    kwargs=encode(kwargs, _handle_of))  # fmt: skip

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return _ask(op="getattr", h=self._handle, name=name)

    def __iter__(self):
        return _ask(op="iter", h=self._handle)

    def __next__(self):
        return _ask(op="next", h=self._handle)

    def __len__(self) -> int:
        n = _ask(op="len", h=self._handle)
        if type(n) is not int:
            raise ProtocolError("len() answered with a non-int")
        return n

    def __getitem__(self, key):
        return _ask(op="getitem", h=self._handle, key=encode(key, _handle_of))

    def _refuse(self, *_):
        raise TypeError(
            f"the program answered with a {self._kind}, not a plain value: a test compares "
            "plain values only (its own ==), never an object of the program"
        )

    __eq__ = __ne__ = __lt__ = __le__ = __gt__ = __ge__ = __bool__ = __hash__ = _refuse

    def __repr__(self) -> str:
        return f"<program's {self._kind}>"


_conn: Channel | None = None
_cap = 0


def _handle_of(value):
    if type(value) is Remote:
        return {"h": value._handle}
    raise TypeError(f"a {type(value).__name__} cannot cross to the program; pass plain values")


def _ask(**request):
    send(_conn, request)
    answer = recv(_conn, _cap)
    if type(answer) is not dict:
        raise ProtocolError("an answer that is not an object")
    if "value" in answer:
        return decode(answer["value"], Remote)
    names, message = answer.get("raise"), answer.get("message")
    well_formed = type(names) is list and all(type(n) is str for n in names)
    if not well_formed or type(message) is not str:
        raise ProtocolError("an answer that is neither a value nor an exception")
    for name in names:  # the first built-in Exception in the raised type's MRO
        cls = getattr(builtins, name, None)
        if isinstance(cls, type) and issubclass(cls, Exception):
            try:
                error = cls(message)
            except TypeError:  # one that takes other arguments (UnicodeDecodeError): its base
                continue
            raise error
    raise ProgramError(f"{names[0] if names else '?'}: {message}")


def _drop_privileges(uid: int) -> None:
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)


def _read_part() -> dict:
    """The next part of the task on stdin: a 4-byte length, then JSON. Read to the byte with
    os.read (no buffering), so nothing after this part is in memory yet."""
    data, size = b"", None
    while size is None or len(data) < size:
        want = HEADER.size - len(data) if size is None else size - len(data)
        chunk = os.read(0, want)
        if not chunk:
            raise EOFError("the task ended early")
        data += chunk
        if size is None and len(data) == HEADER.size:
            (size,), data = HEADER.unpack(data), b""
    return json.loads(data)


def _helpers(head: dict) -> tuple[dict | None, str | None]:
    """With an entry point, the task's code_prefix run here, alone: the definitions the tests
    get instead of the program's. Run before the fork, so what it imports the program finds
    already imported (HumanEval's `from typing import List` would otherwise load twice)."""
    if not head.get("entry_point"):
        return None, None
    ns = {"__name__": "__main__", "__builtins__": builtins}
    try:
        exec(compile(head.get("code_prefix", ""), "<code_prefix>", "exec"), ns)
    except BaseException as e:
        return None, f"code_prefix: {describe(e)}"
    return ns, None


def _test_namespace(names: dict, helpers: dict | None, entry: str | None) -> dict:
    """What the tests see: the program's names, or the helpers and the program's entry point
    (the module docstring, step 4)."""
    program = {k: decode(v, Remote) for k, v in names.items() if type(k) is str}
    if helpers is None:
        return {"__name__": "__main__", "__builtins__": builtins, **program}
    ns = dict(helpers)
    ns.pop(entry, None)
    if entry in program:
        ns[entry] = program[entry]
    return ns


def main() -> None:
    _judge()
    os._exit(0)  # the report is written (os.write); the interpreter's teardown is wasted time


def _judge() -> None:
    global _conn, _cap
    config = json.loads(sys.argv[1])
    if config.get("uid") is not None:
        _drop_privileges(config["uid"])
    _become_undumpable(uid_changed=config.get("uid") is not None)
    head = _read_part()  # code_prefix and entry_point; the tests come after the fork
    helpers, helpers_error = _helpers(head)
    from_judge, to_program = os.pipe()  # (read end, write end)
    from_program, to_judge = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(to_program)
        os.close(from_program)
        serve(Channel(from_judge, to_judge), config)
    os.close(from_judge)
    os.close(to_judge)
    _conn, _cap = Channel(from_program, to_program), config["answer_bytes"]
    report_fd = os.dup(1)  # the report's own fd; 1 and 2 go quiet while tests run
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the judge's life

    def report(**line) -> None:
        os.write(report_fd, (json.dumps(line) + "\n").encode())

    body = _read_part()
    try:
        send(_conn, {"program": body["program"]})
        ran = recv(_conn, _cap)
    except ProgramGone:
        report(crashed=_exit_status(pid))
        return
    except ProtocolError as e:
        report(crashed=str(e))
        return
    if type(ran) is not dict or type(ran.get("names", ran.get("error"))) not in (dict, str):
        report(crashed="the program process answered nonsense")
        return
    error = ran.get("error") or helpers_error
    if error:
        report(program=str(error)[:ERROR_CHARS])
        report(done=True)
        return
    try:
        ns = _test_namespace(ran["names"], helpers, head.get("entry_point"))
    except ProtocolError as e:
        report(crashed=str(e))
        return
    for i, test in enumerate(body["tests"]):
        try:
            exec(compile(test, f"<test {i}>", "exec"), ns)
        except ProgramGone:
            report(t=i, ok=False, error="the program process ended")
            report(crashed=_exit_status(pid))
            return
        except BaseException as e:
            report(t=i, ok=False, error=describe(e))
        else:
            report(t=i, ok=True)
    report(done=True)


def _exit_status(pid: int) -> str:
    """How the program process ended. Its channel closed: it exited, or it closed the channel and
    lives on, and then it gets a second before it is killed."""
    for _ in range(100):
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.01)
    else:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        return "the program process closed its channel to the judge"
    if os.WIFSIGNALED(status):
        return f"the program process was killed by signal {os.WTERMSIG(status)}"
    return f"the program process exited with status {os.waitstatus_to_exitcode(status)}"
