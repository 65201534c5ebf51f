#!/usr/bin/env bash
# Repack ../shared/gpu's three staging parts (.gpu-stage/p1 p2 p3, from stage_vllm.sh) into two calls'
# worth (.gpu-stage/q1, q2), each under the device tool's 64 MiB per call together with the working tree:
# the machine goes back 30 s after a call, and on 2026-12-03 it did so between staging calls twice.
#   call 1: carry [".gpu-stage/q1"]  mkdir -p /tmp/stage/whl && cp .gpu-stage/q1/vpart_* /tmp/stage/ && cp .gpu-stage/q1/whl/* /tmp/stage/whl/
#   call 2: carry [".gpu-stage/q2"]  cp .gpu-stage/q2/vpart_* /tmp/stage/ && cp .gpu-stage/q2/whl/* /tmp/stage/whl/ &&
#           cp .gpu-stage/q2/install_vllm.sh /tmp/stage/ && bash /tmp/stage/install_vllm.sh && <your command>
set -euo pipefail
cd "$(dirname "$0")/.."
S=.gpu-stage
[ -d $S/p1 ] && [ -d $S/p2 ] && [ -d $S/p3/whl ] || { echo "run ../shared/gpu/stage_vllm.sh first" >&2; exit 1; }
limit=$((64 * 1024 * 1024 - 256 * 1024))  # 256 KiB margin for names and metadata
tree=$(git ls-files -z --cached --others --exclude-standard | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
rm -rf $S/q1 $S/q2 && mkdir -p $S/q1/whl $S/q2/whl
ln -f $S/p1/vpart_* $S/q1/ && ln -f $S/p2/vpart_* $S/q2/ && cp $S/p3/install_vllm.sh $S/q2/
bytes() { find "$@" -type f -printf '%s\n' | awk '{s += $1} END {print s + 0}'; }
room=$((limit - tree - $(bytes $S/q1)))
for f in $(ls -S $S/p3/whl/*.whl); do  # largest first into call 1 while they fit, the rest into call 2
  size=$(stat -c %s "$f")
  if [ "$size" -le "$room" ]; then ln -f "$f" $S/q1/whl/; room=$((room - size)); else ln -f "$f" $S/q2/whl/; fi
done
for q in q1 q2; do
  total=$(( $(bytes $S/$q) + tree ))
  echo "$q: $(ls $S/$q/whl | wc -l) wheels, $((total / 1024)) KiB with the working tree (limit $((limit / 1024)) KiB)"
  [ "$total" -le "$limit" ] || { echo "$q is over the limit: use the three p-calls" >&2; exit 1; }
done
