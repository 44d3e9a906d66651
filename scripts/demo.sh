#!/usr/bin/env bash
# The main job on the built-in default data, on a fresh machine:
#   1. create .venv (if absent) and install memlm with the data extra
#   2. fetch six public-domain Jane Austen novels (Debian package r-cran-janeaustenr) as a mini PG-19 tree
#   3. train the tiny baseline for 300 steps on the CPU (resumes if a run already exists)
#   4. evaluate validation perplexity and print a greedy sample
# Run it again and it reuses the venv, the books and the checkpoints.
set -euo pipefail
case "${1:-}" in
  -h|--help) sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//'
             echo "Environment: PYTHON (default python3), RUN_DIR (runs/tiny_baseline), BOOKS_DIR (data/books)."
             exit 0 ;;
  "") ;;
  *) echo "demo.sh: takes no arguments (got '$1'; --help explains)" >&2; exit 2 ;;
esac
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
RUN=${RUN_DIR:-runs/tiny_baseline}
BOOKS=${BOOKS_DIR:-data/books}
export TF_CPP_MIN_LOG_LEVEL=3 JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}

if [ ! -x .venv/bin/python ]; then
  echo "== creating .venv"
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import memlm, seqio, tensorflow_datasets" 2>/dev/null || [ ! -x .venv/bin/memlm ]; then
  echo "== installing memlm[data] (about a minute)"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e '.[data]'
fi
MEMLM=.venv/bin/memlm

echo "== books -> $BOOKS"
$MEMLM data fetch-books "$BOOKS"

echo "== training configs/tiny/baseline.yaml -> $RUN (resumes from the latest checkpoint)"
$MEMLM train configs/tiny/baseline.yaml "run.dir=$RUN" "data.path=$BOOKS"

echo "== evaluating validation perplexity"
$MEMLM eval lm --run "$RUN" --split validation --out "$RUN/eval_validation.json" --force  # its own result, replaced on a rerun

echo "== a greedy sample"
.venv/bin/python - "$RUN" <<'PY'
import sys
import memlm
lm = memlm.load(sys.argv[1])
prompt = "It is a truth universally acknowledged, that"
out = lm.generate(lm.tokenizer.encode(prompt), max_new_tokens=80)
print(prompt + lm.tokenizer.decode(out))
PY

cat <<MSG
== done
checkpoints : $RUN/checkpoints
metrics     : $RUN/metrics.jsonl
config      : $RUN/config.yaml
evaluation  : $RUN/eval_validation.json
tensorboard : .venv/bin/tensorboard --logdir $RUN/tensorboard   (pip install tensorboard)
MSG
