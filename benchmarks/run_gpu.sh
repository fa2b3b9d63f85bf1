#!/usr/bin/env bash
# Run benchmarks/kernels_gpu.py on a GPU machine that has this repo but perhaps not our venv,
# and no internet. Uses the python there ($PYTHON, default python3) as it is: it needs torch
# built with CUDA and triton (nothing else: the kernels' import chain is torch + triton only).
# Nothing can be installed offline, so a missing module is reported and the run stops.
#
#   OUT=/some/dir bash benchmarks/run_gpu.sh            # full grid, ~2-3 minutes on an H200
#   OUT=/some/dir bash benchmarks/run_gpu.sh --quick    # any kernels_gpu.py arguments pass through
#
# Writes $OUT/kernels_gpu.json, $OUT/kernels_gpu.png (when matplotlib is installed) and
# $OUT/kernels_gpu.log (default OUT: benchmarks/results), then $OUT/tensor_parallel_fused_op.json / .log. Exit code: kernels_gpu.py's (0 all
# checks passed, 1 a check failed, 2 no CUDA device), or 1 when a required module is missing.
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results}"
PYTHON="${PYTHON:-python3}"
mkdir -p "$OUT"
unset TRITON_INTERPRET  # compiled kernels, not the interpreter
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # this tree's tokenfx, installed or not

if ! command -v "$PYTHON" >/dev/null; then
    echo "run_gpu: no $PYTHON on this machine; set PYTHON=/path/to/python (with torch + CUDA and triton)" >&2
    exit 1
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total --format=csv
command -v cc >/dev/null || command -v gcc >/dev/null || command -v clang >/dev/null \
    || echo "run_gpu: warning: no C compiler (cc/gcc/clang) found; triton builds its launcher with one" >&2

# What is there, what is missing; whether importing the three ops pulls anything heavy.
"$PYTHON" - <<'EOF'
import importlib, sys

print(f"python {sys.version.split()[0]} at {sys.executable}")
missing = []
for name in ("torch", "triton"):
    try:
        module = importlib.import_module(name)
        print(f"{name} {module.__version__}")
    except Exception as exc:  # an import that raises is as missing as one that is absent
        missing.append(f"{name} ({type(exc).__name__}: {exc})")
for name, without in (("matplotlib", "no plot"), ("transformers", "machine info without its version")):
    try:
        importlib.import_module(name)
    except Exception:
        print(f"optional {name} missing: {without}")
if missing:
    print("run_gpu: required module(s) missing: " + "; ".join(missing)
          + ". This machine has no internet, so pip cannot fetch them: use a python that has them "
          "(PYTHON=...), or install wheels copied here with `pip install --no-index <wheel files>`.", file=sys.stderr)
    sys.exit(1)
import torch

print(f"torch CUDA build {torch.version.cuda}, available: {torch.cuda.is_available()}"
      + (f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""))
before = set(sys.modules)
try:
    for name in ("tokenfx.codegen.tree_attention", "tokenfx.codegen.kv_compact", "tokenfx.codegen.add_norm",
                 "tokenfx.codegen.triton.tree_attention", "tokenfx.codegen.triton.kv_compact",
                 "tokenfx.codegen.triton.add_norm"):
        importlib.import_module(name)
except Exception as exc:
    print(f"run_gpu: importing {name} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
    sys.exit(1)
heavy = sorted({m.split(".")[0] for m in set(sys.modules) - before} & {"onnx", "onnxscript", "onnxruntime", "transformers"})
print("tokenfx kernel modules import" + (f", pulling in {heavy}" if heavy else " without onnx / transformers"))
EOF
rc=$?
[ "$rc" -eq 0 ] || exit "$rc"

"$PYTHON" benchmarks/kernels_gpu.py --out "$OUT/kernels_gpu.json" "$@" 2>&1 | tee "$OUT/kernels_gpu.log"
rc=${PIPESTATUS[0]}
# kernels_gpu.py writes the plot beside the JSON, so it is in $OUT already.
if [ -f "$OUT/kernels_gpu.png" ]; then echo "run_gpu: plot at $OUT/kernels_gpu.png"; else echo "run_gpu: no plot (see the log)"; fi

# tokenfx::allreduce_add_norm on this one GPU at world size 1 (a one-rank NCCL group): NCCL all-reduce + the
# add_norm Triton kernel against the NCCL-free references (add_norm's torch reference and Triton kernel).
quick=""; for a in "$@"; do [ "$a" = "--quick" ] && quick="--quick"; done
"$PYTHON" benchmarks/tensor_parallel.py --fused-op cuda --out "$OUT" $quick 2>&1 | tee "$OUT/tensor_parallel_fused_op.log"
fused_rc=${PIPESTATUS[0]}
[ "$rc" -eq 0 ] && rc=$fused_rc
exit "$rc"
