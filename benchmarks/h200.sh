#!/usr/bin/env bash
# The H200 run of benchmarks/README.md in one command, for an offline GPU machine:
#   bash benchmarks/h200.sh [NAME] [extra vist2_bench.py arguments]
# Installs the wheels in .whl/ (transformers 5.12.0, tokenizers, regex: see README.md) into /tmp/site when there are
# any, checks the decode step captured as a CUDA graph against the dynamic one (benchmarks/decode_graph_check.py,
# results/NAME-decode-graph.{json,md}), runs the benchmark (writes results/NAME.{json,md,png}; the JSON after every
# case, so a run cut short keeps what it measured) and, when $OUT is set, copies the results there; it exits non-zero
# when either step failed. Time limits (90 s and 480 s by default) keep the whole under a 10-minute call.
set -uo pipefail
cd "$(dirname "$0")/.."
name=${1:-h200}; shift || true
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || true
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
# First, under a minute: the captured decode step against the dynamic one (logits and speed, results/NAME-decode-graph).
timeout "${CHECK_TIMEOUT:-90}" python3 benchmarks/decode_graph_check.py --device cuda --name "$name-decode-graph"
check=$?
timeout "${BENCH_TIMEOUT:-480}" python3 benchmarks/vist2_bench.py --preset qwen3-0.6b --device cuda \
  --contexts 8192 32768 --new-tokens 256 --ratios 4 --read-ratios 4 --no-flops --threads 0 --repeats 2 --malloc default --profile \
  --name "$name" "$@"
status=$?
[ -f "benchmarks/results/$name.json" ] && python3 benchmarks/vist2_bench.py --report-only "benchmarks/results/$name.json"
if [ -n "${OUT:-}" ]; then cp benchmarks/results/"$name".* benchmarks/results/"$name"-decode-graph.* "$OUT"/ 2>/dev/null || true; fi
[ "$check" -ne 0 ] && echo "decode-graph check failed (exit $check): see its output above" >&2
exit $(( status != 0 ? status : check ))
