#!/usr/bin/env bash
# Every lab command once, in its smallest form, from the repository root (`make bench-smoke`):
# checks that the lab runs against the installed runtime, not what it measures. Outputs go to a
# temporary folder (or $1), never to bench/results/. About 15 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
out="${1:-$(mktemp -d -t kvp-bench-smoke-XXXX)}"
mkdir -p "$out"
step() { echo "== $*" >&2; local t0=$SECONDS; "$@" >"$out/last.log" 2>&1 || { cat "$out/last.log" >&2; exit 1; };
         echo "   ok ($((SECONDS - t0)) s)" >&2; }

step "$PY" -m kvp_mlx.testing "$out/random-pair"
step "$PY" -m bench.ttft --model "$out/random-pair" --prompt-lengths 16 --batch-sizes 1 -n 1 --no-calibrate \
    --no-plots --out "$out/ttft"
step "$PY" -m bench.ttft --profile conversation --model "$out/random-pair" --history-tokens 32 --new-tokens 8 -n 1 \
    --no-plots --out "$out/ttft"
step "$PY" -m bench.ttft_model --validate bench/results/2026-12-03-vm/quick.json
step "$PY" -m bench.toyworld --profile smoke --out "$out/toyworld" --export-demo "$out/toyworld/demo"
step "$PY" -m bench.accuracy --toyworld "$out/toyworld" --out "$out/accuracy" --max-samples 4 --max-files 2
step "$PY" -m bench.pareto --toyworld "$out/toyworld" --out "$out/pareto" --prompts 1 --warmup 1 -n 1 --max-samples 2
step "$PY" -m bench.convworld --profile smoke --out "$out/convworld"
step "$PY" -m bench.kvp_layers --model "$out/convworld/kvp" --data "$out/convworld/data/test.json" \
    --format synthetic --conversations 1 --max-tokens 4
step "$PY" -m bench.lazy_table --shape tiny --prompt-len 64 --reps 1 --warmup 1
step "$PY" -m bench.softmax_share --prompt-length 64 --repetitions 1
step "$PY" -m bench.epicache_memory --lengths 256 512 --budget 64 --block 64 --layers 2 --out "$out/epicache"
step "$PY" -m bench.draft_speed --max-tokens 4 --prompt-chars 200 --num-draft-tokens 2 --repetitions 1 --warmup 1 \
    --out "$out/draft"
step "$PY" -m bench.runahead --model "$out/random-pair/base" --ranks 2 --prompt-tokens 32 --repeats 1 --timeout 120
step "$PY" -m bench.serve_load --clients 2 --requests 1 --max-tokens 4 --chat-repeats 1 --out "$out/serve"
echo "every lab command ran; outputs in $out" >&2
