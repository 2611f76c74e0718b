#!/usr/bin/env bash
# One GPU check for tuneops (< 6 min): training arms + full job with MLflow on CUDA, then the gateway on CUDA.
#
#   OUT=/some/folder bash scripts/device_check.sh              # on the lent GPU machine (carry .whl and .devcarry)
#   OUT=/tmp/x DEVICE_CHECK_CPU=1 bash scripts/device_check.sh  # CPU smoke run: same code paths, tiny sizes
#   (or: bash scripts/device_check.sh --cpu-smoke)
#   DEVICE_CHECK_COMPILED=1 adds the recipe with training.compile to the training arms (about a minute more)
#
# Missing Python packages come from the wheels in .whl/ (installed into /tmp/site, no index, no deps); the
# SmolLM2 config + tokenizer come from .devcarry/smollm2-config and the weights are random (nothing is fetched).
# Writes $OUT/device_check.log (everything printed), $OUT/device_check.json (summary), $OUT/train.json.
# Each step is reported and the next one runs even when it fails; exit status 1 when any step failed.
set -uo pipefail

cd "$(dirname "$0")/.." || exit 1
ROOT=$PWD
for a in "$@"; do [ "$a" = "--cpu-smoke" ] && export DEVICE_CHECK_CPU=1; done
SMOKE=${DEVICE_CHECK_CPU:-0}
OUT=${OUT:-$(mktemp -d /tmp/device-check-out.XXXXXX)}
mkdir -p "$OUT"
LOG="$OUT/device_check.log"
: >"$LOG"
exec > >(tee -a "$LOG") 2>&1
TEE_PID=$!

PY=${PYTHON:-python3}
SITE=${DEVICE_CHECK_SITE:-/tmp/site}
WORK=$(mktemp -d /tmp/tuneops-devcheck.XXXXXX)
BASE="$WORK/base"
mkdir -p "$WORK/tmp"
TRAIN_TIMEOUT=${TRAIN_TIMEOUT:-$([ "$SMOKE" = 1 ] && echo 480 || echo 240)}
SERVE_TIMEOUT=${SERVE_TIMEOUT:-$([ "$SMOKE" = 1 ] && echo 300 || echo 150)}
declare -A STATUS SECONDS_OF
ORDER=()

run_step() {  # run_step NAME TIMEOUT CMD...: run, time, record the exit status; never stops the script
  local name=$1 limit=$2
  shift 2
  echo
  echo "########## $name (timeout ${limit}s) $(date -u +%H:%M:%S)"
  local t0=$SECONDS
  timeout -k 10 "$limit" "$@"
  local rc=$?
  SECONDS_OF[$name]=$((SECONDS - t0))
  STATUS[$name]=$rc
  ORDER+=("$name")
  if [ "$rc" -eq 0 ]; then
    echo "########## $name: OK in ${SECONDS_OF[$name]}s"
  elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    echo "########## $name: TIMED OUT after ${SECONDS_OF[$name]}s (rc $rc)"
  else
    echo "########## $name: FAILED rc $rc after ${SECONDS_OF[$name]}s"
  fi
  return 0
}

echo "tuneops device check, $(date -u '+%Y-%m-%d %H:%M:%S UTC'), mode: $([ "$SMOKE" = 1 ] && echo cpu-smoke || echo cuda)"
echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo 'n/a (no .git)'); work: $WORK; out: $OUT"

# 1. The machine
if [ "$SMOKE" = 1 ]; then
  run_step gpu 30 bash -c 'nvidia-smi -L 2>/dev/null || echo "no nvidia-smi (CPU smoke run)"'
else
  run_step gpu 30 bash -c 'nvidia-smi -L && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || { echo "nvidia-smi not available"; exit 1; }'
fi

# Wheels for what the machine lacks (pydantic, mlflow, datasets, fastapi, openai, ...), no index, no deps
install_wheels() {
  if ! ls .whl/*.whl >/dev/null 2>&1; then
    echo "no .whl/*.whl here: was .whl carried?"
    return 1
  fi
  echo "$(ls .whl/*.whl | wc -l) wheels, $(du -sh .whl | cut -f1)"
  if "$PY" -m pip --version >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
      2>&1 | grep -v -e "^WARNING: Target directory" -e "already exists. Specify --upgrade" -e "as the 'root' user" || true
  else  # no pip: a wheel is a zip whose top level goes on sys.path as is
    echo "no pip for $PY: unzipping the wheels into $SITE"
    mkdir -p "$SITE"
    for w in .whl/*.whl; do "$PY" -m zipfile -e "$w" "$SITE" || return 1; done
  fi
  [ -d "$SITE/mlflow" ] && [ -d "$SITE/pydantic_core" ] && [ -d "$SITE/sqlalchemy" ]
}
if [ "${DEVICE_CHECK_SKIP_INSTALL:-0}" = 1 ]; then
  echo "wheel install skipped (DEVICE_CHECK_SKIP_INSTALL=1), site: $SITE"
else
  export -f install_wheels; export PY SITE
  run_step wheels 150 bash -c install_wheels  # timeout runs programs, not shell functions
fi
export PYTHONPATH="$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export TUNEOPS_CACHE="$WORK/cache" HF_HOME="$WORK/hf" MPLBACKEND=Agg PYTHONUNBUFFERED=1
export TMPDIR="$WORK/tmp"
export MLFLOW_TRACKING_URI="sqlite:///$WORK/mlflow-default.db" GIT_PYTHON_REFRESH=quiet

run_step versions 90 "$PY" -c '
import importlib, sys
print("python", sys.version.split()[0])
for m in ("torch", "transformers", "peft", "accelerate", "datasets", "pydantic", "pydantic_settings", "mlflow",
          "sqlalchemy", "alembic", "fastapi", "starlette", "uvicorn", "openai", "httpx", "prometheus_client",
          "zaragoza_construction_faq"):
    try:
        mod = importlib.import_module(m)
        v = getattr(mod, "__version__", "?")
        print(f"{m:26} {v:14} {mod.__file__}")
    except Exception as exc:
        print(f"{m:26} MISSING: {type(exc).__name__}: {exc}")
import torch
print("cuda available:", torch.cuda.is_available(), "| torch cuda:", torch.version.cuda,
      "| device:", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-",
      "| bf16:", torch.cuda.is_available() and torch.cuda.is_bf16_supported())
import mlflow, mlflow.pyfunc, mlflow.store.tracking.sqlalchemy_store, core.pyfunc, core.registry, finetune.job, serve.server
print("imports: mlflow.pyfunc, sqlalchemy store, core, finetune, serve OK")
'

SMOKE_ARG=()
[ "$SMOKE" = 1 ] && SMOKE_ARG=(--cpu-smoke)

# 2. The random-weight SmolLM2-135M-shaped base folder (shared by training and serving)
run_step base 90 "$PY" scripts/device_check_train.py "${SMOKE_ARG[@]}" --base-dir "$BASE" --build-only

# 3. Training: baseline vs recipe arms, then run_job with MLflow (+ QLoRA when bitsandbytes is there)
run_step train "$TRAIN_TIMEOUT" "$PY" scripts/device_check_train.py "${SMOKE_ARG[@]}" --base-dir "$BASE" \
  --json "$OUT/train.json"

# 4. Serving: the colleague's gateway check, unchanged, against the same base folder
if [ "$SMOKE" = 1 ]; then
  run_step serve "$SERVE_TIMEOUT" "$PY" scripts/device_check_train.py --serve-smoke -- --base "$BASE" --clients 4 \
    --max-tokens 8
else
  run_step serve "$SERVE_TIMEOUT" "$PY" scripts/device_check_serve.py --base "$BASE" --clients 16
fi

# 5. Summary
echo
echo "########## summary"
STEPS_JSON=""
FAILED=0
for n in "${ORDER[@]}"; do
  printf '%-10s rc=%-4s %4ss\n' "$n" "${STATUS[$n]}" "${SECONDS_OF[$n]}"
  STEPS_JSON+="\"$n\": {\"rc\": ${STATUS[$n]}, \"seconds\": ${SECONDS_OF[$n]}},"
  [ "${STATUS[$n]}" -ne 0 ] && FAILED=1
done
STEPS_JSON="{${STEPS_JSON%,}}"
"$PY" - "$OUT" "$LOG" "$STEPS_JSON" "$SMOKE" <<'EOF'
import json, re, sys
from pathlib import Path

out, log, steps, smoke = Path(sys.argv[1]), Path(sys.argv[2]), json.loads(sys.argv[3]), sys.argv[4] == "1"
text = log.read_text(errors="replace")
summary = {"mode": "cpu-smoke" if smoke else "cuda", "steps": steps, "ok": all(s["rc"] == 0 for s in steps.values())}
gpus = re.findall(r"^GPU \d+: .*$", text, re.M)
summary["gpus"] = gpus
train = out / "train.json"
if train.is_file():
    summary["train"] = json.loads(train.read_text())
serve = {}
for m in re.finditer(r"^\s*(\d+) clients: (\d+) tokens in ([\d.]+) s = ([\d.]+) tok/s", text, re.M):
    serve[f"clients_{m.group(1)}"] = {"tokens": int(m.group(2)), "seconds": float(m.group(3)),
                                      "tokens_per_second": float(m.group(4))}
m = re.search(r"^engine device: (.*), dtype: (.*)$", text, re.M)
if m:
    serve["engine_device"], serve["engine_dtype"] = m.group(1), m.group(2)
summary["serve"] = serve
(out / "device_check.json").write_text(json.dumps(summary, indent=2))
a = summary.get("train", {}).get("arms", {})
for name, ratio in a.get("ratio", {}).items():
    print(f"train: recipe/{name} {ratio['tokens_per_second']}x real tok/s "
          f"({a['recipe']['tokens_per_second']} vs {a[name]['tokens_per_second']}), "
          f"peak {a['recipe']['peak_mib']} vs {a[name]['peak_mib']} MiB, "
          f"val loss {a['recipe']['eval_loss']} vs {a[name]['eval_loss']}")
if "target_met" in a:
    print(f"train: recipe >= 2x padded at no worse validation loss: {a['target_met']}")
j = summary.get("train", {}).get("job", {})
if "run_id" in j:
    print(f"job: run {j['run_id']} {j['status']}, version {j['version']}")
for k, v in serve.items():
    if isinstance(v, dict):
        print(f"serve {k}: {v['tokens_per_second']} tok/s")
print(f"wrote {out / 'device_check.json'}")
EOF
echo "device check: $([ $FAILED = 0 ] && echo ALL OK || echo SOME STEPS FAILED)"
rm -rf "$WORK"
exec 1>&- 2>&-
wait "$TEE_PID" 2>/dev/null  # the log is complete before the machine hands $OUT back
exit $FAILED
