#!/usr/bin/env python3
"""`leftovers.py CMD ARGS...`: runs CMD, then fails if a process it started is still running.

It looks at the processes CMD started and at no others, so a shared machine's own servers
(someone else's `python3 -m http.server`) cannot fail it. This script makes itself a child
subreaper (PR_SET_CHILD_SUBREAPER): a process whose parent dies is re-parented to its nearest
subreaper ancestor, so every process CMD started stays this script's descendant, even after a
double fork or a `setsid` (tests/process.rs starts a `setsid python3 -m http.server` on purpose,
which a check by session id would not see). While CMD runs, orphans that exit are reaped at once,
as init would, so a test that waits for a process to be gone sees it gone.

Exit status: CMD's when it failed; else 1 if anything it started outlived it (listed, then
killed, so that CI leaves nothing running); else 0.
"""

import ctypes
import os
import signal
import subprocess
import sys
import time

PR_SET_CHILD_SUBREAPER = 36
# Time for processes on their way out (SIGKILLed by a supervisor, PDEATHSIG) to be gone.
GRACE_SECONDS = 5.0


def processes():
    """pid -> (ppid, state) of every process on the machine."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read().decode(errors="replace")
        except OSError:
            continue
        # The command name may hold spaces and parentheses: the fields follow the last ')'.
        fields = stat[stat.rfind(")") + 2 :].split()
        table[int(entry)] = (int(fields[1]), fields[0])
    return table


def descendants(root):
    """The live (not zombie) descendants of `root`."""
    table = processes()
    children = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found, todo = [], list(children.get(root, []))
    while todo:
        pid = todo.pop()
        if table[pid][1] != "Z":
            found.append(pid)
        todo.extend(children.get(pid, []))
    return sorted(found)


def reap():
    """Waits for every child that has exited (re-parented orphans included)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def describe(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            args = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        args = "?"
    return f"  pid {pid}: {args}"


def main():
    if len(sys.argv) < 2:
        sys.exit("usage: leftovers.py CMD [ARGS...]")
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        sys.exit(f"leftovers.py: prctl(PR_SET_CHILD_SUBREAPER): {os.strerror(ctypes.get_errno())}")
    me = os.getpid()
    cmd = subprocess.Popen(sys.argv[1:])
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda s, _: cmd.send_signal(s))
    # Reap everything, as init would, until CMD itself has exited.
    while True:
        try:
            pid, status = os.waitpid(-1, 0)
        except ChildProcessError:
            sys.exit("leftovers.py: lost track of the command")
        except InterruptedError:
            continue
        if pid == cmd.pid:
            code = os.waitstatus_to_exitcode(status)
            cmd.returncode = code
            break

    deadline = time.monotonic() + GRACE_SECONDS
    while True:
        reap()
        left = descendants(me)
        if not left or time.monotonic() >= deadline:
            break
        time.sleep(0.1)
    if left:
        print(f"processes left running after `{' '.join(sys.argv[1:])}`:", flush=True)
        for pid in left:
            print(describe(pid), flush=True)
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.2)
        reap()
    else:
        print(f"no process left running after `{' '.join(sys.argv[1:])}`", flush=True)
    if code != 0:
        sys.exit(code if code > 0 else 128 - code)
    sys.exit(1 if left else 0)


if __name__ == "__main__":
    main()
