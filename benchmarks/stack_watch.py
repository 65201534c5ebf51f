"""Print where every Python process under a root process is, at given times, for diagnosing stalls.

    python benchmarks/stack_watch.py ROOT_PID --at 45,90 >> stacks.log

At each time (seconds after start) it lists the root's descendants and, for each Python process, prints
its stack with py-spy (`dump --native`, when py-spy is installed: the only way to see a thread blocked in
C code, e.g. a CUDA call) or else sends SIGUSR1 (the plugin's VLLM_CQ_STACK_DUMP_S handler prints the
stacks to that process's stderr). A GPU snapshot (utilization, memory) from nvidia-smi goes beside it:
a stall at 100% utilization is a kernel that does not finish, at 0% a host that waits.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time


def descendants(root: int) -> list[int]:
    """The root and every process below it (from /proc's parent links)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="utf-8") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def is_python(pid: int) -> bool:
    try:
        return "python" in os.path.basename(os.readlink(f"/proc/{pid}/exe"))
    except OSError:
        return False


def catches_sigusr1(pid: int) -> bool:
    """Whether the process has a SIGUSR1 handler (the plugin's stack dump); the default action kills."""
    try:
        with open(f"/proc/{pid}/status", encoding="utf-8") as f:
            caught = next(int(ln.split()[1], 16) for ln in f if ln.startswith("SigCgt:"))
    except (OSError, StopIteration):
        return False
    return bool(caught >> (signal.SIGUSR1 - 1) & 1)


def py_spy() -> str | None:
    found = shutil.which("py-spy")
    if found:
        return found
    for d in os.environ.get("PYTHONPATH", "").split(os.pathsep):
        cand = os.path.join(d, "bin", "py-spy")
        if d and os.path.exists(cand):
            return cand
    return None


def snapshot(root: int, spy: str | None) -> None:
    print(f"=== stack_watch t={time.strftime('%H:%M:%S')} root={root}", flush=True)
    if shutil.which("nvidia-smi"):
        q = "utilization.gpu,memory.used,power.draw"
        r = subprocess.run(["nvidia-smi", f"--query-gpu={q}", "--format=csv,noheader"], capture_output=True, text=True)
        print(f"gpu: {r.stdout.strip()}", flush=True)
    for pid in descendants(root):
        if not is_python(pid):
            continue
        print(f"--- pid {pid}: {cmdline(pid)[:200]!r}", flush=True)
        r = None
        if spy:
            r = subprocess.run([spy, "dump", "--native", "--pid", str(pid)], capture_output=True, text=True, timeout=60)
            print((r.stdout + r.stderr).rstrip(), flush=True)
        if (r is None or r.returncode != 0) and catches_sigusr1(pid):
            try:
                os.kill(pid, signal.SIGUSR1)
            except ProcessLookupError:
                pass


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root", type=int)
    p.add_argument("--at", default="60", help="comma-separated seconds after start")
    args = p.parse_args()
    t0 = time.monotonic()
    for at in sorted(float(x) for x in args.at.split(",")):
        time.sleep(max(0.0, at - (time.monotonic() - t0)))
        if not os.path.exists(f"/proc/{args.root}"):
            return 0
        try:
            snapshot(args.root, py_spy())
        except subprocess.TimeoutExpired as e:
            print(f"py-spy timed out: {e}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
