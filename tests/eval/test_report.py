"""Table, relative numbers, JSON and plot from a synthetic result (no vLLM)."""

from __future__ import annotations

import json

import pytest

from vllm_cq.eval import report


def result() -> dict:
    rows = [
        {"format": "auto", "bits_per_channel": 16, "kv_cache_tokens": 1000, "ppl": 20.0, "passkey": {"1024": 1.0}},
        {"format": "cq4", "bits_per_channel": 4, "kv_cache_tokens": 4000, "ppl": 21.0, "passkey": {"1024": 0.8}},
        {"format": "cq2", "error": "exit code 1: CodebookError: no cq2 codebooks", "log": "x.log"},
    ]
    for r in rows:
        r.setdefault("seconds", 10.0)
    return {
        "model": "/m/SmolLM2",
        "model_name": "SmolLM2",
        "tasks": ["ppl", "passkey"],
        "device": "CPU",
        "vllm_version": "0.32.0",
        "date": "2026-11-23",
        "text": "test.txt",
        "ppl_window": 1024,
        "ppl_tokens": 4092,
        "passkey": {"lengths": [1024], "depths": [0.1, 0.5], "keys_per_depth": 1, "trials_per_length": 2, "seed": 0},
        "rows": rows,
    }


def test_relative_to_auto_and_table():
    r = result()
    report.add_relative(r["rows"])
    auto, cq4, bad = r["rows"]
    assert cq4["ppl_delta_pct"] == pytest.approx(5.0) and cq4["kv_factor"] == pytest.approx(4.0)
    assert auto["ppl_delta_pct"] == pytest.approx(0.0) and bad["ppl_delta_pct"] is None
    table = report.markdown_table(r)
    lines = table.splitlines()
    assert lines[0].startswith("| format | bits/channel | KV tokens | vs auto | ppl | ppl vs auto | passkey 1K (%)")
    assert "| cq4 | 4 | 4,000 | 4.0x | 21.000 | +5.0% | 80 | 10 |" in lines
    assert any(ln.startswith("| cq2 | error: exit code 1: CodebookError") for ln in lines)
    assert "prefill over stored codes" in report.describe(r)
    assert report.summary_line(cq4) == "cq4: 4,000 KV tokens, ppl 21.000, passkey 1K 80% (10 s)"


def test_no_auto_row_means_no_relative_numbers():
    r = result()
    r["rows"] = r["rows"][1:2]
    report.add_relative(r["rows"])
    assert r["rows"][0]["ppl_delta_pct"] is None and r["rows"][0]["kv_factor"] is None
    assert "| cq4 | 4 | 4,000 |  | 21.000 |  | 80 | 10 |" in report.markdown_table(r)


def test_json_round_trip(tmp_path):
    r = result()
    path = tmp_path / "sub" / "out.json"
    report.write_json(str(path), r)
    assert json.loads(path.read_text()) == r
    assert not (tmp_path / "sub" / "out.json.tmp").exists()


def test_plot_writes_a_png_or_says_why_not(tmp_path):
    r = result()
    msg = report.plot(str(tmp_path / "p.png"), r)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert msg.startswith("plot skipped: matplotlib is not installed")
        return
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert msg == f"plot: {tmp_path / 'p.png'}"


def test_length_labels():
    assert [report.length_label(n) for n in (1024, 2048, 8192, 1000)] == ["1K", "2K", "8K", "1000"]


def test_merge_runs_over_different_formats(tmp_path):
    """Runs of one evaluation on two GPUs (or two sessions) make one table; a later row of the same
    format replaces the earlier (e.g. a format re-run after its failure); other setups are refused."""
    a, b = result(), result()
    a["rows"] = a["rows"][:2]  # auto, cq4
    b["rows"] = [{"format": "cq2", "kv_cache_tokens": 8000, "ppl": 25.0, "passkey": {"1024": 0.5}, "seconds": 3.0}]
    merged = report.merge([result(), b])  # the failed cq2 row is replaced
    assert [r["format"] for r in merged["rows"]] == ["auto", "cq4", "cq2"]
    assert merged["rows"][2]["ppl_delta_pct"] == pytest.approx(25.0) and merged["rows"][2]["kv_factor"] == 8.0
    assert "error" not in merged["rows"][2]
    c = result()
    c["ppl_tokens"] = 999
    with pytest.raises(ValueError, match="ppl_tokens"):
        report.merge([a, c])

    from vllm_cq.cli import main

    for name, res in (("a", a), ("b", b)):
        report.write_json(str(tmp_path / f"{name}.json"), res)
    out = tmp_path / "all.json"
    argv = ["eval", "SmolLM2", "--merge", str(tmp_path / "a.json"), str(tmp_path / "b.json")]
    assert main([*argv, "--out", str(out), "--no-plot"]) == 0
    assert [r["format"] for r in json.loads(out.read_text())["rows"]] == ["auto", "cq4", "cq2"]
