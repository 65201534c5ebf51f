"""Pick the CUDA kernels' opt-in builds for the rest of a GPU window from `gpu_session.sh s13a`'s output.

Why: a warm machine is given back 30 s after a call, too soon to read a table and choose by hand, and the
window's later calls (the kernel grid, end to end) should measure the defaults the repo will ship. So the
rule is written down here, before the numbers exist: a build is taken only if every kernel test passed in
it, it is at least 2% faster over the decode rows it was timed on (geometric mean against the plain build,
`cq-cuda-plain`; `cq-cuda` in files from before 2026-12-04 c, when the plain build was the default), no
row is more than 5% slower, and a layout-constant build does not slow prefill by more than 1%. Of the
builds that qualify, the fastest wins, else the plain build. The choice is printed and written as shell
`export` lines that set both switches, so it holds whatever the code's defaults (since 2026-12-04 c
layout constants and persistent CTAs, the build this rule chose on the H200 that day).

    python benchmarks/pick_build.py ATTENTION_JSON TESTS_RC [--env-out FILE]
"""

from __future__ import annotations

import argparse
import json
import math
import sys

BASE, OLD_BASE = "cq-cuda-plain", "cq-cuda"


def _build(layout: int, persistent: int) -> dict[str, str]:
    return {"VLLM_CQ_LAYOUT_CONSTANTS": str(layout), "VLLM_CQ_DECODE_PERSISTENT": str(persistent)}


PLAIN = _build(0, 0)
# backend -> the environment that makes it the build every later call runs
CANDIDATES: dict[str, dict[str, str]] = {
    "cq-cuda-const": _build(1, 0),
    "cq-cuda-persist": _build(0, 1),
    "cq-cuda-const-persist": _build(1, 1),
}
MIN_GAIN = 0.98  # geometric-mean time ratio a build must reach
MAX_ROW = 1.05  # no single row slower than this
MAX_PREFILL = 1.01  # a layout-constant build's prefill ratio
MIN_ROWS = 4


def _ms(rows: list[dict], backend: str, kind: str) -> dict[tuple, float]:
    return {
        (r["kv_dtype"], r["batch"], r["context"], r.get("q_len")): r["ms"]
        for r in rows
        if r.get("backend") == backend and r.get("kind") == kind and r.get("ms")
    }


def _ratios(rows: list[dict], backend: str, kind: str) -> list[float]:
    base = _ms(rows, BASE, kind) or _ms(rows, OLD_BASE, kind)
    cand = _ms(rows, backend, kind)
    return [cand[k] / base[k] for k in sorted(cand.keys() & base.keys())]


def _geomean(xs: list[float]) -> float:
    return math.exp(sum(math.log(x) for x in xs) / len(xs))


def decide(rows: list[dict], tests_passed: bool) -> tuple[str | None, list[str]]:
    """(the chosen backend or None, one line of reasoning per candidate)."""
    lines, ok = [], {}
    for backend in CANDIDATES:
        dec = _ratios(rows, backend, "decode")
        if len(dec) < MIN_ROWS:
            lines.append(f"{backend}: {len(dec)} decode rows matched, need {MIN_ROWS}: not taken")
            continue
        g, worst = _geomean(dec), max(dec)
        pre = _ratios(rows, backend.removesuffix("-persist"), "prefill") if "const" in backend else []
        gp = _geomean(pre) if pre else None
        why = []
        if not tests_passed:
            why.append("kernel tests did not all pass")
        if g > MIN_GAIN:
            why.append(f"decode geomean {g:.3f} > {MIN_GAIN}")
        if worst > MAX_ROW:
            why.append(f"a decode row at {worst:.3f} > {MAX_ROW}")
        if "const" in backend and (gp is None or gp > MAX_PREFILL):
            why.append("no prefill rows" if gp is None else f"prefill geomean {gp:.3f} > {MAX_PREFILL}")
        pre_txt = f", prefill {gp:.3f} ({len(pre)} rows)" if gp is not None else ""
        stats = f"decode {g:.3f} over {len(dec)} rows (best {min(dec):.3f}, worst {worst:.3f}){pre_txt}"
        lines.append(f"{backend}: {stats}: " + ("taken" if not why else "not taken, " + "; ".join(why)))
        if not why:
            ok[backend] = g
    return (min(ok, key=ok.get) if ok else None), lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("attention_json")
    ap.add_argument("tests_rc", help="the kernel tests' pytest exit status")
    ap.add_argument("--env-out", help="write the chosen build's `export` lines here")
    args = ap.parse_args(argv)
    try:
        with open(args.attention_json) as f:
            rows = json.load(f)["rows"]
    except (OSError, ValueError, KeyError) as e:
        print(f"no rows ({e}): the plain build")
        rows = []
    choice, lines = decide(rows, args.tests_rc.strip() == "0")
    print("\n".join(lines))
    env = CANDIDATES[choice] if choice else PLAIN
    print(f"-> {choice or 'the plain build'}: {env}")
    if args.env_out:
        with open(args.env_out, "w") as f:
            f.writelines(f"export {k}={v}\n" for k, v in env.items())
    return 0


if __name__ == "__main__":
    sys.exit(main())
