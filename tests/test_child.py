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


# arms the dumps, forks (as vLLM does for its engine core), and in the child waits in a named function,
# then re-arms (as a plugin loading there would): both must work in the forked child
FORKING = textwrap.dedent(
    """
    import os, time
    from vllm_cq.child import dump_stacks_from_env
    dump_stacks_from_env()
    pid = os.fork()
    if pid == 0:
        def waiting_in_forked_child():
            time.sleep(2.6)
        waiting_in_forked_child()
        dump_stacks_from_env()
        print("child re-armed", flush=True)
        os._exit(0)
    os.waitpid(pid, 0)
    print("parent done", flush=True)
    """
)


def test_stack_dumps_reach_a_forked_child_and_rearm_there(tmp_path):
    import subprocess

    env = {**os.environ, "VLLM_CQ_STACK_DUMP_S": "1"}
    out = subprocess.run([sys.executable, "-c", FORKING], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "child re-armed" in out.stdout and "parent done" in out.stdout
    assert "waiting_in_forked_child" in out.stderr  # the child's watchdog dumped its stack


def test_sigusr1_dumps_stacks_and_the_process_goes_on(tmp_path):
    import signal
    import subprocess

    script = textwrap.dedent(
        """
        import time
        from vllm_cq.child import dump_stacks_from_env
        dump_stacks_from_env()
        def waiting_for_the_signal():
            print("ready", flush=True)
            time.sleep(3)
        waiting_for_the_signal()
        print("still alive", flush=True)
        """
    )
    env = {**os.environ, "VLLM_CQ_STACK_DUMP_S": "600"}
    proc = subprocess.Popen(
        [sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and "still alive" in out
    assert "waiting_for_the_signal" in err


# the child starts a grandchild that ignores SIGINT (as a forked engine core blocked in C code does), then
# waits on it; SIGINT ends the child at once, and the grandchild must still be stopped
STUBBORN = textwrap.dedent(
    """
    import subprocess, sys
    code = "import signal as s, time; s.signal(s.SIGINT, s.SIG_IGN); print('core up', flush=True); time.sleep(300)"
    g = subprocess.Popen([sys.executable, "-c", code])
    print("grandchild", g.pid, flush=True)
    g.wait()
    """
)


def test_timeout_stops_a_grandchild_that_ignores_sigint(tmp_path):
    log = tmp_path / "engine.log"
    t0 = time.perf_counter()
    rc = run_logged([sys.executable, "-c", STUBBORN], str(log), timeout=3)
    assert rc == TIMEOUT_RC and time.perf_counter() - t0 < 60
    text = log.read_text()
    pid = int(next(ln for ln in text.splitlines() if ln.startswith("grandchild")).split()[1])
    deadline = time.time() + 10
    while _alive(pid) and time.time() < deadline:
        time.sleep(0.1)
    assert not _alive(pid), "the grandchild outlived the timeout"
