"""The program's process: forked by the judge before the task is read; runs the program, then
answers the judge's requests with plain values (package docstring, steps 3-4). Everything here
runs with the program in the same interpreter, so nothing here is trusted by the judge."""

from __future__ import annotations

import builtins
import os
import resource
import sys
import types

from .wire import ERROR_CHARS, Channel, ProtocolError, decode, encode, recv, send


def serve(ch: Channel, config: dict) -> None:
    """Run the program and answer the judge's requests until the judge hangs up. Never returns."""
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    low, high = sorted((ch.read_fd, ch.write_fd))
    os.closerange(3, low)  # everything of the judge's but the channel
    os.closerange(low + 1, high)
    os.closerange(high + 1, 1 << 16)
    sys.stdin = sys.stdout = sys.stderr = open(os.devnull, "w")  # noqa: SIM115 - for its life
    sys.path += config["paths"]
    _limit(config)
    if config.get("guard"):
        sys.addaudithook(_process_guard(os.path.realpath(os.getcwd())))
    cap = config["answer_bytes"]
    objects: list = []

    def keep(obj):
        objects.append(obj)
        kind = type(obj).__name__ if not callable(obj) else f"callable {type(obj).__name__}"
        return {"h": len(objects) - 1, "k": kind}

    def lookup(h: int, _kind: str):
        if not 0 <= h < len(objects):
            raise ProtocolError(f"no object {h}")
        return objects[h]

    def reply(fn, *args) -> dict:
        try:
            return {"value": encode(fn(*args), keep)}
        except BaseException as e:  # everything the program raises is an answer, even SystemExit
            return {"raise": [c.__name__ for c in type(e).__mro__], "message": str(e)[:ERROR_CHARS]}

    def answer(req: dict):
        target, op = objects[req["h"]], req["op"]
        if op == "call":
            return target(*decode(req["args"], lookup), **decode(req["kwargs"], lookup))
        if op == "getattr":
            return getattr(target, req["name"])
        if op == "getitem":
            return target[decode(req["key"], lookup)]
        return {"iter": iter, "next": next, "len": len}[op](target)

    try:
        source = recv(ch, 1 << 30)["program"]
        ns = {"__name__": "__main__", "__builtins__": builtins}
        ran = reply(lambda: exec(compile(source, "<program>", "exec"), ns))
        if "raise" in ran:
            send(ch, {"error": f"{ran['raise'][0]}: {ran['message']}"})
            os._exit(0)
        names = {k: encode(v, keep) for k, v in ns.items()
                 if not k.startswith("__") and not isinstance(v, types.ModuleType)}  # fmt: skip
        send(ch, {"names": names})
        while True:
            send(ch, reply(answer, recv(ch, cap)))
    except BaseException:  # the judge hung up, or sent nonsense: nothing left to answer
        os._exit(0)


def _limit(config: dict) -> None:
    """The program's rlimits. RLIMIT_NPROC counts the processes of this uid (per user namespace
    where there is one); the PID namespace holds only the run, so the processes already running
    (the judge, this one) plus `processes` - 1 is the program's share."""
    cpu = int(config["seconds"]) + 1
    limits = [(resource.RLIMIT_CPU, cpu), (resource.RLIMIT_AS, config["memory_bytes"]),
              (resource.RLIMIT_FSIZE, config["file_bytes"]), (resource.RLIMIT_CORE, 0),
              (resource.RLIMIT_NOFILE, config["open_files"])]  # fmt: skip
    if config.get("processes"):
        running = sum(1 for p in os.listdir("/proc") if p.isdigit())
        limits.append((resource.RLIMIT_NPROC, running - 1 + config["processes"]))
    for which, value in limits:
        resource.setrlimit(which, (value, value))


def _process_guard(root: str):
    """`sandbox: process` only: an audit hook against honest mistakes (a stray write or socket).
    PEP 578 says it plainly: this is not a security boundary; code written to escape gets out."""
    write = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    path_events = {"os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.symlink", "os.link",
                   "os.truncate", "os.chmod", "os.chown", "os.utime", "shutil.rmtree",
                   "shutil.copyfile", "shutil.copytree", "shutil.move", "os.chdir", "os.chroot"}  # fmt: skip
    refused = ("socket.", "subprocess.", "os.system", "os.exec", "os.posix_spawn", "os.spawn",
               "os.fork", "os.forkpty", "pty.", "ctypes.", "os.kill", "os.killpg", "signal.")  # fmt: skip

    def inside(path) -> bool:
        if isinstance(path, int):
            return True
        try:
            real = os.path.realpath(os.fsdecode(path))
        except (TypeError, ValueError):
            return False
        return real == root or real.startswith(root + os.sep)

    def guard(event: str, args) -> None:
        if event.startswith(refused):
            raise PermissionError(f"sandbox: {event} is not allowed")
        if event == "open":
            path, mode, flags = (tuple(args) + (None, None))[:3]
            writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & write
            )
            if writes and not inside(path):
                raise PermissionError(f"sandbox: writing {path!r} outside the working folder")
        elif event in path_events:
            for path in args:
                if isinstance(path, str | bytes | os.PathLike) and not inside(path):
                    raise PermissionError(f"sandbox: {event} on {path!r} outside the folder")

    return guard
