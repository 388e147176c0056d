#!/usr/bin/env bash
# The package's checks on a machine with CUDA GPUs, in one command, within 8 minutes on one GPU.
#
#   benchmarks/gpu_check.sh                          # results under gpu_check_results/
#   OUT_DIR=/tmp/gc PYTHON=/usr/bin/python3 benchmarks/gpu_check.sh
#
# It installs nothing: it runs on the interpreter in $PYTHON (default python3) with its own torch (CUDA build)
# and pytest, and puts this repository on PYTHONPATH. Parts whose framework is missing (DeepSpeed, fairseq,
# fastfeedforward) or whose script lacks GPU support say so and are skipped. Parts, each with its own time limit:
#   env        torch, CUDA, GPUs, grouped_mm, optional frameworks             env.json
#   pytest     the cuda cases of the test suite (pytest -k cuda)               pytest_cuda.log, pytest_cuda.xml
#   grouped    grouped_mm probe: runs? equals a loop? grouped vs dense speed   grouped_mm.json, grouped_mm.log
#   training   benchmarks/bench_training.py --quick --device cuda, if it has --device
#   inference  benchmarks/bench_inference.py on the GPU, if it has --device
#   deepspeed  FFFMoE at ep_size 2 over 2 GPUs (NCCL), with 2 GPUs and DeepSpeed   deepspeed_ep2.json
# Everything goes under $OUT_DIR (default gpu_check_results/), with summary.json listing each part's status.
# Exit status: 0 when no part failed (skipped parts do not count), 1 otherwise. Without a GPU: a message, 0.
set -u

cd "$(dirname "$0")/.." || exit 1
REPO=$(pwd)
PY=${PYTHON:-python3}
OUT_DIR=${OUT_DIR:-gpu_check_results}
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

# seconds per part; they add up to 450, under the 8 minutes
T_ENV=20 T_PYTEST=150 T_GROUPED=60 T_TRAINING=120 T_INFERENCE=40 T_DEEPSPEED=60

if ! "$PY" -c "import torch" 2>/dev/null; then
    echo "gpu_check: '$PY' cannot import torch; set PYTHON to an interpreter with a CUDA build of torch" >&2
    exit 1
fi
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_check: no CUDA GPU here (torch $("$PY" -c 'import torch; print(torch.__version__)' 2>/dev/null)," \
         "torch.cuda.is_available() is False): nothing to check. The CPU tests are 'make test'."
    exit 0
fi

mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
if command -v timeout >/dev/null; then
    HAVE_TIMEOUT=1
else
    HAVE_TIMEOUT=0
    echo "gpu_check: no 'timeout' command: the parts run without their time limits" >&2
fi
START=$(date +%s)
STATUS_FILE="$OUT_DIR/status.tsv"
: > "$STATUS_FILE"
FAILED=0

# run NAME SECONDS LOG CMD...: run a part with its time limit, log its output, record its status
run() {
    local name=$1 limit=$2 log=$3 rc t0
    shift 3
    echo "== $name (limit ${limit}s): $*"
    t0=$(date +%s)
    if [ "$HAVE_TIMEOUT" = 1 ]; then
        timeout -k 10 "$limit" "$@" > "$log" 2>&1
    else
        "$@" > "$log" 2>&1
    fi
    rc=$?
    tail -n 25 "$log" | sed 's/^/   /'
    local status=ok
    if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
        status="timed out after ${limit}s"
    elif [ "$rc" != 0 ]; then
        status="failed (exit $rc)"
    fi
    [ "$status" = ok ] || FAILED=1
    echo "   -> $name: $status in $(( $(date +%s) - t0 ))s; log $log"
    printf '%s\t%s\t%s\n' "$name" "$status" "$log" >> "$STATUS_FILE"
}

# skip NAME REASON: record a part that does not run here
skip() {
    echo "== $1: skipped: $2"
    printf '%s\t%s\t\n' "$1" "skipped: $2" >> "$STATUS_FILE"
}

# has_flag SCRIPT FLAG: whether SCRIPT's --help lists FLAG
has_flag() {
    [ -f "$1" ] && "$PY" "$1" --help 2>/dev/null | grep -qE -- "(^|[^-[:alnum:]])$2([^-[:alnum:]]|\$)"
}

run env "$T_ENV" "$OUT_DIR/env.log" "$PY" benchmarks/gpu_check.py env --json "$OUT_DIR/env.json"

run pytest "$T_PYTEST" "$OUT_DIR/pytest_cuda.log" "$PY" -m pytest -q -rs -p no:cacheprovider -k cuda \
    --junitxml="$OUT_DIR/pytest_cuda.xml" tests

run grouped "$T_GROUPED" "$OUT_DIR/grouped_mm.log" "$PY" benchmarks/gpu_check.py grouped --device cuda \
    --json "$OUT_DIR/grouped_mm.json"

if ! [ -f benchmarks/bench_training.py ]; then
    skip training "benchmarks/bench_training.py does not exist"
elif ! has_flag benchmarks/bench_training.py --device; then
    skip training "benchmarks/bench_training.py has no --device option (CPU only)"
else
    extra=()
    has_flag benchmarks/bench_training.py --json && extra=(--json "$OUT_DIR/bench_training.json")
    run training "$T_TRAINING" "$OUT_DIR/bench_training.log" "$PY" benchmarks/bench_training.py --quick \
        --device cuda ${extra[@]+"${extra[@]}"}
fi

if has_flag benchmarks/bench_inference.py --device; then
    run inference "$T_INFERENCE" "$OUT_DIR/bench_inference.log" "$PY" benchmarks/bench_inference.py --quick \
        --device cuda --json "$OUT_DIR/bench_inference.json"
else
    skip inference "benchmarks/bench_inference.py has no --device option (it measures the CPU kernels)"
fi

NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
if [ "$NGPU" -lt 2 ]; then
    skip deepspeed "ep_size 2 needs 2 GPUs, this machine has $NGPU"
elif ! "$PY" -c "import deepspeed" >/dev/null 2>&1; then
    skip deepspeed "DeepSpeed is not importable by $PY (pip install deepspeed)"
else
    run deepspeed "$T_DEEPSPEED" "$OUT_DIR/deepspeed_ep2.log" "$PY" benchmarks/gpu_check.py deepspeed --device cuda \
        --out "$OUT_DIR" --timeout $(( T_DEEPSPEED - 10 ))
fi

ELAPSED=$(( $(date +%s) - START ))
"$PY" - "$OUT_DIR" "$ELAPSED" <<'EOF'
import json, sys, xml.etree.ElementTree as ET
from pathlib import Path

out, elapsed = Path(sys.argv[1]), int(sys.argv[2])
parts = []
for line in (out / "status.tsv").read_text().splitlines():
    name, status, log = (line.split("\t") + ["", ""])[:3]
    parts.append({"part": name, "status": status, "log": log or None})
summary = {"elapsed_s": elapsed, "parts": parts}
xml = out / "pytest_cuda.xml"
if xml.exists():
    suite = ET.parse(xml).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    summary["pytest_cuda"] = counts
if (out / "env.json").exists():
    summary["env"] = json.loads((out / "env.json").read_text())
(out / "summary.json").write_text(json.dumps(summary, indent=2))
print(f"\nsummary ({elapsed} s), {out / 'summary.json'}:")
for p in parts:
    print(f"  {p['part']:10s} {p['status']}")
if "pytest_cuda" in summary:
    print("  pytest -k cuda: " + ", ".join(f"{v} {k}" for k, v in summary["pytest_cuda"].items() if k != "tests"))
EOF
rm -f "$STATUS_FILE"
exit "$FAILED"
