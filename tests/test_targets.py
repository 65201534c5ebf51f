"""benchmarks/targets.py: issue 5's targets computed from results files (synthetic rows with known
factors; later files win; a missing row is reported as missing, not as met)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import targets  # noqa: E402


def attention_file(path: Path, rows: list[dict]) -> str:
    path.write_text(json.dumps({"benchmark": "attention", "rows": rows}))
    return str(path)


def row(kind, backend, kv, batch, context, q_len, ms, **extra) -> dict:
    return dict(kind=kind, backend=backend, kv_dtype=kv, batch=batch, context=context, q_len=q_len, ms=ms, **extra)


def test_targets_from_results_files(tmp_path, capsys):
    old = attention_file(tmp_path / "a.json", [row("decode", "cq-cuda", "cq1", 64, 32768, 1, 9.0)])
    new = attention_file(
        tmp_path / "b.json",
        [
            row("decode", "fa3", "bf16", 64, 32768, 1, 2.0),
            row("decode", "fa3", "fp8", 64, 32768, 1, 1.5),
            row("decode", "cq", "cq1", 64, 32768, 1, 0.8),  # the Triton dispatch: the CUDA row wins
            row("decode", "cq-cuda", "cq1", 64, 32768, 1, 0.5),  # later than a.json's 9.0
            row("decode", "cq-cuda", "cq1", 16, 32768, 1, 0.1),  # another shape: ignored
            row("prefill", "fa3", "bf16", 1, 8192, 8192, 1.0),
            row("prefill", "cq-cuda", "cq1", 1, 8192, 8192, 1.5),
            row("write", "cq", "cq1", 64, 4096, 1, 0.01, pct_of_decode_attention={"4096": 4.0, "32768": 0.5}),
            row("write", "cq", "cq1", 128, 4096, 1, 0.01, pct_of_decode_attention={"4096": 2.5, "32768": 0.3}),
        ],
    )
    e2e = tmp_path / "e.json"
    e2e_rows = [
        dict(kv_cache_dtype="auto", workload="128x4096+512", output_tok_s=1000.0, tag="t"),
        dict(kv_cache_dtype="fp8", workload="128x4096+512", output_tok_s=1500.0, tag="t"),
        dict(kv_cache_dtype="cq1", workload="128x4096+512", output_tok_s=1800.0, tag="t"),
        dict(kv_cache_dtype="cq1", workload="128x4096+512", output_tok_s=2400.0, tag="other"),
        dict(kv_cache_dtype="auto", workload="96x8192+256", output_tok_s=400.0, tag="t"),
    ]
    e2e.write_text(json.dumps({"benchmark": "e2e_throughput", "rows": e2e_rows}))
    got = {r["what"]: r for r in targets.main([old, new, str(e2e), "--tag", "t"])}
    assert got["decode 64 x 32K, cq1 vs FA3 bf16"]["measured"] == 4.0 and got["decode 64 x 32K, cq1 vs FA3 bf16"]["met"]
    assert got["decode 64 x 32K, cq1 vs FA3 fp8"]["measured"] == 3.0
    assert got["prefill 8K causal, cq1 / FA3 bf16"]["measured"] == 1.5
    assert not got["prefill 8K causal, cq1 / FA3 bf16"]["met"]
    share = got["encoding, share of a decode step's attention"]
    assert share["measured"] == 2.5 and share["met"] and "128 sequences" in share["detail"]
    assert got["end to end 128x4096+512, cq1 vs auto"]["measured"] == 1.8  # tag t only
    assert got["end to end 128x4096+512, cq1 vs fp8"]["measured"] == 1.2
    missing = got["end to end 96x8192+256, cq1 vs auto"]
    assert missing["measured"] is None and missing["met"] is None  # no cq1 row: not met, not failed
    assert "| decode 64 x 32K, cq1 vs FA3 bf16 | >= 4.0x faster | 4.00x | yes |" in capsys.readouterr().out
