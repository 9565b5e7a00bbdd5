"""What runs inside the sandbox: the judge (judge.py), the program's process (program.py) and the
messages between them (wire.py). The judge is the first process of a run, PID 1 of its PID
namespace. The program runs in a child process; the tests run in the judge, where no line of the
program ever ran, so the program cannot rewrite them, patch the interpreter they run in, or
write the report.

Standard library only, relative imports only: this folder is mounted read-only inside the
sandbox as a top-level package (`inside`), where the upcycle package is not; run.py starts it with
`python -I -S -B -c "...; from inside.judge import main; main()" CONFIG`. CONFIG (argv) holds
only limits and ids; the program and the tests arrive on stdin. In order:
1. Identity: drop to CONFIG's uid (bwrap started as root has no user namespace, so the judge
   arrives as root with CAP_SETUID/CAP_SETGID only) and be non-dumpable: a process of the same
   uid can then neither ptrace the judge nor open its /proc/<pid>/mem, fd/ or environ. (The uid
   change itself does this where fs.suid_dumpable is 0; elsewhere prctl does.)
2. Read the task's first part (code_prefix, entry_point) and, with an entry point, run the
   prefix here: the helpers the tests will use (step 5), and its imports already loaded for the
   program (HumanEval's `from typing import List` would otherwise load twice).
3. Fork the program's process before the rest of the task (program, tests) is read, so the
   tests never exist in its memory. It points fds 0-2 at /dev/null (100 MB of prints cost
   nothing and reach no one), takes the rlimits and CONFIG's package folders on sys.path (the
   interpreter starts with -S: site's .pth processing cost more than the rest of a run), and
   waits for its source.
4. Read the rest and send the program. The program's process runs it, then answers requests
   on a pair of pipes: call, getattr, iter, next, len, getitem of its objects. Answers are
   plain values (None, bool, int, float, complex, str, bytes, list, tuple, dict, set, frozenset)
   as tagged JSON, decoded in the judge into fresh objects of exactly those built-in types;
   anything else stays in the program as a handle (`Remote`) that refuses ==, <, bool() and
   hash(). So every comparison a test makes is the judge's own: an answer whose __eq__ lies,
   an int subclass, an object patched through gc, cannot pass.
5. Run each test in the judge. The names the program defined are `Remote`s or decoded values;
   with an `entry_point`, the tests see the helpers of step 2 and only the entry point from
   the program, so a sample cannot redefine what its tests rely on (HumanEval's `poly`,
   `encode_cyclic`). One JSON line per test goes to a private duplicate of stdout (fd 1 points
   at /dev/null while tests run, so a test's prints cannot forge lines).
Messages between the two are capped in size (CONFIG's answer_bytes); the scorer caps the report.
"""
