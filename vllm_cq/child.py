"""Run one engine child process with its output in a log file and a timeout that really stops it.

The eval, capacity and e2e harnesses start one vLLM engine per KV-cache format in a fresh process.
vLLM's engine core is a grandchild that inherits the child's stdout, so killing only the child at a
timeout leaves the grandchild holding the pipe open (the parent then blocks reading it until the
grandchild exits) and holding GPU memory (the next format's engine then fails or stalls). Seen on the
H200 on 2026-12-01: a 150 s eval timeout blocked for the rest of a 480 s call, and its log, block-
buffered in the killed parent, came back empty. So the child runs in its own session, the whole group
is stopped on timeout, and every line is written to the log as it arrives.
"""

from __future__ import annotations

import faulthandler
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence

TIMEOUT_RC = 124


def _group_alive(pgid: int) -> bool:
    """Whether a live (not zombie) process is left in process group `pgid` (Linux /proc; elsewhere any)."""
    if not os.path.isdir("/proc"):
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        return True
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", encoding="utf-8") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":  # state, ppid, pgrp
                return True
    return False


def kill_group(proc: subprocess.Popen) -> None:
    """SIGINT, then SIGTERM, then SIGKILL to the process group `proc` leads (started with
    start_new_session, so the group is this child and its descendants only), escalating until the
    whole group is gone: the leader exiting is not enough (a forked engine core blocked in C code
    ignores SIGINT and would keep the GPU and the log pipe)."""
    for sig, wait in ((signal.SIGINT, 15), (signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if proc.poll() is not None and not _group_alive(proc.pid):
                return
            time.sleep(0.1)
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass


def run_logged(
    cmd: Sequence[str],
    log_path: str,
    timeout: float | None = None,
    env: dict[str, str] | None = None,
    on_line: Callable[[str], bool] | None = None,
    mode: str = "w",
) -> int:
    """Run `cmd` (stdout and stderr together) writing each line to `log_path` as it arrives, except
    lines `on_line` returns True for (consumed, e.g. progress messages). Returns the exit code, or
    TIMEOUT_RC (124) when `timeout` seconds passed and the child's process group was stopped."""
    with open(log_path, mode, encoding="utf-8", errors="replace", buffering=1) as log:
        proc = subprocess.Popen(
            list(cmd),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            env=env,
            start_new_session=True,
        )

        def pump() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                if on_line is None or not on_line(line):
                    try:
                        log.write(line)
                    except ValueError:  # log closed: the reader outlived its join below
                        return

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        timed_out = False
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_group(proc)
            rc, timed_out = TIMEOUT_RC, True
        # a descendant that left the group (its own session) could still hold the pipe: do not wait on it
        reader.join(timeout=10)
        if timed_out:
            log.write(f"\n[vllm-cq] stopped after {timeout:.0f} s (timeout)\n")
    return rc


_dump_every: float = 0.0


def _arm_dump() -> None:
    faulthandler.dump_traceback_later(_dump_every, repeat=True, file=sys.stderr)


def dump_stacks_from_env() -> None:
    """In a child: VLLM_CQ_STACK_DUMP_S=N prints every thread's stack to stderr (the log) every N
    seconds, and on SIGUSR1, so an engine start or step that hangs says where.

    The periodic dump runs in a watchdog thread, which a fork does not copy: vLLM forks its engine
    core by default, and the plugin is not loaded again there (its loaded flag is copied). So the
    watchdog is stopped before every fork and started again on both sides. Without that the forked
    engine core never dumps, and would block for good the first time it re-armed or cancelled the
    dump (the thread it waits for does not exist in the child). The SIGUSR1 handler survives forks.

    A diagnostic, not for measurement runs: faulthandler reads other threads' frames without the GIL,
    and on the H200 (2026-12-01) a periodic dump during tokenization crashed an eval child (SIGSEGV).
    `benchmarks/stack_watch.py` (py-spy from outside) is the safe way to see a stall.
    """
    global _dump_every
    dump = float(os.environ.get("VLLM_CQ_STACK_DUMP_S", "0") or 0)
    if dump <= 0:
        return
    first = _dump_every == 0.0
    _dump_every = dump
    faulthandler.register(signal.SIGUSR1, file=sys.stderr, all_threads=True)
    _arm_dump()
    if first:
        os.register_at_fork(
            before=faulthandler.cancel_dump_traceback_later, after_in_parent=_arm_dump, after_in_child=_arm_dump
        )
