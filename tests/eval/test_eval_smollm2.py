"""`vllm-cq eval` end to end on a real model (SmolLM2-135M), a short slice: perplexity on 3K tokens of
WikiText-2 test and passkey at 1K (one key per depth), for auto, cq4 and cq1 over codes only, and
cq_k4v1 as `--kv-cache-dtype cq_k4v1` serves it (codes plus the default 128-token window), each through
its own vLLM engine. The numbers must be finite and ordered as a working cache orders them; a broken
cache (garbage codes, wrong codebooks, attention over the wrong slots) would break the order or the
bounds. About 5 min on 2 CPU cores once the model and codebooks are cached (see conftest.py)."""

from __future__ import annotations

import json
import math

import pytest

from tests.eval.conftest import TEST_TEXT
from vllm_cq.cli import main as cq_main

FORMATS = ("auto", "cq4+w0", "cq1+w0", "cq_k4v1")  # codes only, and cq_k4v1 as served: its default window
# The engine runs inside each format's process (no extra engine-core and worker processes, each of
# which imports vLLM again), on both cores: the same numbers, a faster start on a small CPU.
ENGINE = {"enforce_eager": True, "distributed_executor_backend": "uni"}


@pytest.mark.slow
def test_eval_smollm2_short_slice(smollm2, smollm2_codebooks, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    monkeypatch.setenv("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    out = tmp_path / "eval.json"
    argv = ["eval", smollm2, "--formats", ",".join(FORMATS), "--text", str(TEST_TEXT), "--ppl-tokens", "3072"]
    argv += ["--passkey-lengths", "1024", "--passkey-keys", "1", "--codebooks", smollm2_codebooks]
    argv += ["--engine", json.dumps(ENGINE), "--out", str(out), "--log-dir", str(tmp_path / "logs"), "--quiet"]
    rc = cq_main(argv)
    printed = capsys.readouterr().out
    res = json.loads(out.read_text())
    rows = {r["format"]: r for r in res["rows"]}
    assert rc == 0, [r.get("error") for r in res["rows"]]
    assert list(rows) == list(FORMATS)

    # what the JSON must say about the run
    assert res["ppl_tokens"] == 3 * 1023 and res["ppl_window"] == 1024
    assert res["passkey"]["trials_per_length"] == 5 and res["vllm_version"] and res["device"]
    for r in rows.values():
        assert r["ppl_tokens"] == res["ppl_tokens"]
        assert len(r["passkey_trials"]) == 5 and set(r["passkey"]) == {"1024"}
        assert r["seconds"] > 0
    assert all(rows[f]["ppl_path"] == "prefill over stored codes" for f in FORMATS[1:])

    # vLLM's own capacity sees the compression (SmolLM2: head_dim 64, bf16 model)
    assert rows["cq4+w0"]["kv_factor"] >= 3.9 and rows["cq1+w0"]["kv_factor"] >= 15
    k4v1, auto_tokens = rows["cq_k4v1"], rows["auto"]["kv_cache_tokens"]
    assert k4v1["recent_window"] == 128 and k4v1["kv_cache_tokens_without_window"] >= 6.2 * auto_tokens
    assert 1 < k4v1["kv_factor"] < 6.2  # whole sequences pay for their window blocks too

    ppl = {f: rows[f]["ppl"] for f in FORMATS}
    assert all(math.isfinite(p) and 1 < p < 1e3 for p in ppl.values()), ppl
    assert ppl["auto"] < 40, ppl  # the model itself is sane (about 21 on WikiText-2 test)
    # 4 bits per channel costs little; 1 bit costs clearly more; keys 4-bit + values 1-bit in between
    assert ppl["auto"] * 0.99 <= ppl["cq4+w0"] <= ppl["auto"] * 1.15, ppl
    assert ppl["cq1+w0"] >= ppl["auto"] * 1.2 and ppl["cq1+w0"] > ppl["cq4+w0"], ppl
    # the window takes 2.5-bit codes close to 4-bit ones (CPU slice, 2026-12-01: +6.7% vs +5.3%; codes only +68%)
    assert ppl["auto"] * 0.99 <= ppl["cq_k4v1"] <= min(ppl["auto"] * 1.15, ppl["cq1+w0"]), ppl

    acc = {f: rows[f]["passkey"]["1024"] for f in FORMATS}
    assert acc["auto"] >= 0.8 and acc["cq4+w0"] >= 0.6 and acc["cq_k4v1"] >= 0.6, acc  # greedy decode over codes

    assert "| cq_k4v1 (w128) | 2.5 |" in printed and "prefill over stored codes" in printed
    print(printed)  # the table, for the CI log (pytest -s or -rA)
