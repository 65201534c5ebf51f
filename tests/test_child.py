"""The engine-child runner: a timeout stops the child's whole process group (vLLM's engine core is a
grandchild holding the output pipe), the log has every line written before the stop, and consumed lines
(progress messages) stay out of the log."""

from __future__ import annotations

import os
import sys
import textwrap
import time

from vllm_cq.child import TIMEOUT_RC, run_logged

# the child prints, starts a grandchild that inherits stdout and sleeps, then sleeps itself
HANGING = textwrap.dedent(
    """
    import subprocess, sys, time
    print("PROGRESS step 1", flush=True)
    print("engine starting", flush=True)
    g = subprocess.Popen([sys.executable, "-c", "import time; print('core up', flush=True); time.sleep(300)"])
    print("grandchild", g.pid, flush=True)
    time.sleep(300)
    """
)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie (not yet reaped) is dead too
        return f.read().split()[2] != "Z"


def test_timeout_stops_the_grandchild_and_keeps_the_log(tmp_path):
    log = tmp_path / "engine.log"
    seen: list[str] = []

    def progress(line: str) -> bool:
        if line.startswith("PROGRESS"):
            seen.append(line.strip())
            return True
        return False

    t0 = time.perf_counter()
    rc = run_logged([sys.executable, "-c", HANGING], str(log), timeout=3, on_line=progress)
    took = time.perf_counter() - t0
    assert rc == TIMEOUT_RC
    assert took < 60, took  # not the grandchild's 300 s
    text = log.read_text()
    assert "engine starting" in text and "core up" in text and "stopped after 3 s" in text
    assert "PROGRESS" not in text and seen == ["PROGRESS step 1"]
    pid = int(next(ln for ln in text.splitlines() if ln.startswith("grandchild")).split()[1])
    deadline = time.time() + 10
    while _alive(pid) and time.time() < deadline:
        time.sleep(0.1)
    assert not _alive(pid)


def test_exit_code_and_all_lines(tmp_path):
    log = tmp_path / "ok.log"
    code = "import sys; print('a'); print('b', file=sys.stderr); sys.exit(3)"
    rc = run_logged([sys.executable, "-c", code], str(log))
    assert rc == 3
    assert sorted(log.read_text().split()) == ["a", "b"]


def test_a_child_exiting_124_without_a_timeout_is_not_a_timeout(tmp_path):
    log = tmp_path / "rc124.log"
    assert run_logged([sys.executable, "-c", "import sys; print('x'); sys.exit(124)"], str(log)) == 124
    assert log.read_text().split() == ["x"]
