"""benchmarks/pick_build.py: the rule that picks the CUDA kernels' opt-in build in a GPU window (synthetic
rows with known ratios: a build is taken only when its tests passed, it wins by the margin, no row
regresses and prefill holds)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import pick_build  # noqa: E402

POINTS = [(16, 1024), (64, 4096), (64, 32768), (128, 4096)]


def rows(backend: str, factor: float, kind: str = "decode", slow_row: float | None = None) -> list[dict]:
    out = []
    for i, (batch, ctx) in enumerate(POINTS if kind == "decode" else [(1, 8192)]):
        f = slow_row if (slow_row is not None and i == 0) else factor
        out.append(dict(kind=kind, backend=backend, kv_dtype="cq1", batch=batch, context=ctx, q_len=1, ms=f))
    return out


def base(name: str = "cq-cuda-plain") -> list[dict]:
    return rows(name, 1.0) + rows(name, 1.0, "prefill")


def test_fastest_qualifying_build_wins():
    data = base() + rows("cq-cuda-const", 0.95) + rows("cq-cuda-const", 0.99, "prefill")
    data += rows("cq-cuda-persist", 0.90) + rows("cq-cuda-const-persist", 0.85)
    choice, lines = pick_build.decide(data, tests_passed=True)
    assert choice == "cq-cuda-const-persist", lines
    assert pick_build.CANDIDATES[choice] == {"VLLM_CQ_LAYOUT_CONSTANTS": "1", "VLLM_CQ_DECODE_PERSISTENT": "1"}


def test_files_from_before_the_plain_backend_compare_against_cq_cuda():
    """Until 2026-12-04 c `cq-cuda` was the plain build (s13a's file); where a file has `cq-cuda-plain` rows,
    `cq-cuda` (now the defaults) is not the baseline."""
    old = base("cq-cuda") + rows("cq-cuda-persist", 0.90)
    assert pick_build.decide(old, tests_passed=True)[0] == "cq-cuda-persist"
    new = base() + rows("cq-cuda", 0.80) + rows("cq-cuda-persist", 0.90)
    choice, lines = pick_build.decide(new, tests_passed=True)
    assert choice == "cq-cuda-persist" and "0.900" in lines[1], lines


@pytest.mark.parametrize(
    "extra, why",
    [
        (rows("cq-cuda-persist", 0.99), "geomean"),  # inside the margin
        (rows("cq-cuda-persist", 0.90, slow_row=1.2), "a decode row"),  # one regressed row
        (rows("cq-cuda-const", 0.90) + rows("cq-cuda-const", 1.05, "prefill"), "prefill geomean"),
        (rows("cq-cuda-const", 0.90), "no prefill rows"),
        (rows("cq-cuda-persist", 0.90)[:2], "need"),  # too few rows matched
    ],
)
def test_a_build_that_does_not_qualify_is_left_off(extra, why):
    choice, lines = pick_build.decide(base() + extra, tests_passed=True)
    assert choice is None and any(why in line for line in lines), lines


def test_failed_tests_keep_the_plain_build(tmp_path, capsys):
    path = tmp_path / "a.json"
    path.write_text(json.dumps({"rows": base() + rows("cq-cuda-persist", 0.8)}))
    env = tmp_path / "env"
    assert pick_build.main([str(path), "1", "--env-out", str(env)]) == 0
    plain = "export VLLM_CQ_LAYOUT_CONSTANTS=0\nexport VLLM_CQ_DECODE_PERSISTENT=0\n"
    assert env.read_text() == plain and "kernel tests did not all pass" in capsys.readouterr().out
    assert pick_build.main([str(path), "0", "--env-out", str(env)]) == 0
    assert env.read_text() == "export VLLM_CQ_LAYOUT_CONSTANTS=0\nexport VLLM_CQ_DECODE_PERSISTENT=1\n"
