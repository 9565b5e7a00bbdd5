"""The messages between judge and program: length-prefixed JSON over a pair of pipes, and plain
values as tagged JSON (see the package docstring, step 3). Both sides use this module; only the
judge trusts what it decodes, because it decodes into fresh objects of exact built-in types."""

from __future__ import annotations

import json
import os
import struct

HEADER = struct.Struct(">I")
MAX_DEPTH = 64  # nesting of a plain value
ERROR_CHARS = 500


class ProgramGone(BaseException):  # noqa: N818 - not an Exception: `except Exception` in a test must not swallow it
    """The program process ended (exit, crash, a signal); no later answer can come."""


class ProtocolError(Exception):
    """A message from the program that is not a well-formed answer."""


class ProgramError(Exception):
    """The program raised an exception that has no built-in counterpart in the judge."""


class Channel:
    """One end of the two pipes between judge and program (pipes, not a socket: the socket
    module's import is a noticeable share of a run)."""

    def __init__(self, read_fd: int, write_fd: int):
        self.read_fd, self.write_fd = read_fd, write_fd


def send(ch: Channel, message) -> None:
    data = json.dumps(message, separators=(",", ":")).encode()
    view = memoryview(HEADER.pack(len(data)) + data)
    try:
        while view:
            view = view[os.write(ch.write_fd, view) :]
    except OSError:  # the other end is closed
        raise ProgramGone from None


def recv_exact(ch: Channel, n: int) -> bytes:
    chunks, got = [], 0
    while got < n:
        try:
            chunk = os.read(ch.read_fd, min(n - got, 1 << 20))
        except OSError:
            chunk = b""
        if not chunk:
            raise ProgramGone
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def recv(ch: Channel, cap: int):
    (size,) = HEADER.unpack(recv_exact(ch, HEADER.size))
    if size > cap:
        raise ProtocolError(f"an answer of {size:,} bytes is over the limit of {cap:,}")
    try:
        return json.loads(recv_exact(ch, size))
    except (ValueError, RecursionError) as e:
        raise ProtocolError(f"an answer that is not JSON: {e}") from None


def encode(value, handle=None, depth: int = 0):
    """`value` as tagged JSON; exact built-in types only. Anything else goes through
    `handle(value)` (the program keeps it and sends a handle), or is a TypeError."""
    t = type(value)
    if value is None or t is bool or t is str:
        return value
    if t is int:
        return {"i": hex(value)}  # hex: no digit limit, no float confusion
    if t is float:
        return {"f": repr(value)}
    if t is complex:
        return {"c": [repr(value.real), repr(value.imag)]}
    if t is bytes:
        return {"b": value.hex()}
    if depth < MAX_DEPTH:
        if t is list:
            return [encode(v, handle, depth + 1) for v in value]
        tag = {tuple: "t", set: "s", frozenset: "fs"}.get(t)
        if tag:
            return {tag: [encode(v, handle, depth + 1) for v in value]}
        if t is dict:
            return {"d": [[encode(k, handle, depth + 1), encode(v, handle, depth + 1)]
                          for k, v in value.items()]}  # fmt: skip
    if handle is None:
        raise TypeError(f"a {t.__name__} cannot cross to the program; pass plain values")
    return handle(value)


def decode(x, handle, depth: int = 0):
    """The value `x` stands for, built fresh from exact built-in types; `handle(id, kind)` turns a
    handle into an object. ProtocolError for anything outside the grammar."""
    t = type(x)
    if x is None or t is bool or t is str:
        return x
    if depth > MAX_DEPTH:
        raise ProtocolError("a value nested too deep")
    if t is list:
        return [decode(v, handle, depth + 1) for v in x]
    if t is dict and "h" in x and type(x["h"]) is int:
        return handle(x["h"], str(x.get("k", "object")))
    if t is not dict or len(x) != 1:
        raise ProtocolError(f"not a plain value: {str(x)[:80]}")
    ((tag, body),) = x.items()
    try:
        if tag == "i" and type(body) is str:
            return int(body, 16)
        if tag == "f" and type(body) is str:
            return float(body)
        if tag == "c" and type(body) is list and len(body) == 2:
            return complex(float(body[0]), float(body[1]))
        if tag == "b" and type(body) is str:
            return bytes.fromhex(body)
        if tag in ("t", "s", "fs") and type(body) is list:
            items = [decode(v, handle, depth + 1) for v in body]
            return {"t": tuple, "s": set, "fs": frozenset}[tag](items)
        if tag == "d" and type(body) is list:
            pairs = [p for p in body if type(p) is list and len(p) == 2]
            if len(pairs) != len(body):
                raise ProtocolError("a dict entry that is not a pair")
            return {decode(k, handle, depth + 1): decode(v, handle, depth + 1) for k, v in pairs}
    except (TypeError, ValueError) as e:  # unhashable keys, bad numbers
        raise ProtocolError(f"a malformed {tag!r} value: {e}") from None
    raise ProtocolError(f"not a plain value: {str(x)[:80]}")


def describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"[:ERROR_CHARS]
