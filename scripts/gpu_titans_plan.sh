#!/usr/bin/env bash
# The Titans-MAG timing plan for a lent GPU (BENCHMARKS.md "Titans", session 15; run in session 18, "GPU (H200)"):
# three model_compare runs, each its own process under its own share of the time left, every row printed and saved
# as it lowers, compiles and times ($OUT_DIR/<step>.partial.json), compiled steps shared through one JAX cache.
#
#   bash scripts/gpu_titans_plan.sh OUT_DIR [TOTAL_SECONDS] [extra gpu_check.py args, e.g. --smoke]
set -u
if [ $# -lt 1 ] || [ "$1" = "-h" ] || [ "$1" = "--help" ]; then
  sed -n '2,6p' "$0" | sed 's/^# \{0,1\}//'
  exit 0
fi
out=$1
total=${2:-540}
shift $(( $# >= 2 ? 2 : 1 ))
case $total in ''|*[!0-9]*) echo "gpu_titans_plan.sh: TOTAL_SECONDS must be a whole number, got '$total'" >&2; exit 2;; esac
mkdir -p "$out" && out=$(cd "$out" && pwd) || exit 2
cd "$(dirname "$0")/.." || exit 2
start=$SECONDS
cache=${TMPDIR:-/tmp}/memlm_jax_cache

extra=("$@")
set --
step() { _step "$@" "${extra[@]}"; }
_step() {  # name, percent of the time left, row regex, extra gpu_check.py args
  local name=$1 pct=$2 rows=$3; shift 3
  local left=$(( total - (SECONDS - start) ))
  local limit=$(( left * pct / 100 ))
  if [ "$limit" -lt 30 ]; then echo "== $name: skipped ($left s left)"; return; fi
  # rows not compiled within 2/3 of the step's time are given up, so the ones that compiled are still timed
  echo "== $name: up to $limit s, compiles up to $(( limit * 2 / 3 )) s"
  timeout "$limit" python3 scripts/gpu_check.py --only model_compare --rows "$rows" --cache-dir "$cache" \
    --compile-limit $(( limit * 2 / 3 )) --out "$out/$name.json" "$@" > "$out/$name.log" 2>&1
  echo "== $name: exit $? after $(( SECONDS - start )) s"
  grep -E "^model_compare" "$out/$name.log" | cut -c1-400
}

# 1. session 11's 2K rows (its best: 2.06x the full-attention baseline; 10 d512 rows compiled there in 107 s) with
#    the two levers that keep the program's size: no per-chunk checkpoint, retrievals after the chunk loop
step mag2k 45 '^d512/(baseline|baseline_full_attention|titans_mag_c64_unroll8(_no_chunk_ckpt|_parallel_retrieval)?)$'
# 2. the paper's 4K context, segment loop rolled (half the compile of the unrolled rows on CPU)
step mag4k_rolled 60 '^d512_4k/(baseline|baseline_full_attention|titans_mag_c64_unroll8_rolled(_no_chunk_ckpt|_parallel_retrieval)?)$'
# 3. the layers pipelined (> 3 min to compile at 4K on an H200 in session 15; the baselines come from the cache)
step mag2k_pipelined 100 '^d512/(baseline|baseline_full_attention|titans_mag_c64_unroll8_pipelined(_no_chunk_ckpt)?)$'

# every timed row of the three runs as ratios (each against the baselines of its own run)
files=()
for name in mag2k mag4k_rolled mag2k_pipelined; do
  if [ -s "$out/$name.json" ]; then files+=("$out/$name.json"); elif [ -s "$out/$name.partial.json" ]; then files+=("$out/$name.partial.json"); fi
done
if [ ${#files[@]} -gt 0 ]; then
  echo "== summary"
  python3 scripts/gpu_check.py --summarize "${files[@]}" | tee "$out/summary.txt"
fi
