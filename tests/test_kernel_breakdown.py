"""benchmarks/kernel_breakdown.py on a synthetic torch-profiler trace: GPU events summed per class, CPU
events ignored, gzipped and plain traces both read (stray NULs skipped), every trace under the directory counted."""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "kernel_breakdown.py"


def load_script():
    spec = importlib.util.spec_from_file_location("kernel_breakdown", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_gpu_time_per_class(tmp_path, capsys):
    kb = load_script()
    rank0 = [
        {"cat": "kernel", "name": "_write_kv_kernel", "dur": 1500.0},
        {"cat": "kernel", "name": "cq_prefill_wgmma_kernel", "dur": 2500.0},
        {"cat": "kernel", "name": "sm90_xmma_gemm_bf16bf16_bf16f32", "dur": 9000.0},
        {"cat": "kernel", "name": "nvjet_tst_128x256_64x4_1x2_h_bz_coopA_TNT", "dur": 1000.0},
        {"cat": "gpu_memcpy", "name": "Memcpy HtoD (Pinned -> Device)", "dur": 200.0},
        {"cat": "kernel", "name": "void at::native::elementwise_kernel<128, 2>", "dur": 300.0},
        {"cat": "cpu_op", "name": "aten::mm", "dur": 99999.0},  # CPU side: not GPU time
        {"ph": "M", "name": "process_name"},
    ]
    (tmp_path / "cq1" / "rank0").mkdir(parents=True)
    with gzip.open(tmp_path / "cq1" / "rank0" / "w.pt.trace.json.gz", "wt") as fh:
        json.dump({"traceEvents": rank0}, fh)
    # with a stray NUL between two tokens, as torch 2.11 wrote into an H200 trace
    front = json.dumps({"traceEvents": [{"cat": "kernel", "name": "cq_decode_kernel", "dur": 500.0}]})
    (tmp_path / "cq1" / "front.pt.trace.json").write_text(front.replace(', "dur"', ',\n\x00 "dur"'))
    out = tmp_path / "b.json"
    assert kb.main([str(tmp_path / "cq1"), "--out", str(out)]) == 0
    (res,) = json.loads(out.read_text())
    assert len(res["files"]) == 2
    assert res["classes"] == {
        "matmul": 0.01,
        "cq prefill attention": 0.0025,
        "cq write": 0.0015,
        "cq decode attention": 0.0005,
        "other": 0.0003,
        "memcpy / memset": 0.0002,
    }
    assert res["gpu_s"] == 0.015
    assert res["top_kernels"][0]["name"].startswith("sm90_xmma_gemm")
    assert "| **all** | **0.015** |" in capsys.readouterr().out
