#!/usr/bin/env bash
# One GPU session's checks, in priority order, each under its own time limit so that one
# hang does not cost the others: the CUDA correctness tests (tests/gpu), the optimizer
# step costs (learned vs fused Adam, eager, then compiled), the compiled training steps,
# and meta-training on the GPU. Logs go to $OUT (the device tool's folder) or ./gpu_out.
#
#   bash benchmarks/gpu_check.sh                 # from the repository root, ~8.5 minutes at most
#
# Runs from the source tree (PYTHONPATH), with the machine's own torch: nothing installed.
set -u
out=${OUT:-gpu_out}
mkdir -p "$out"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
py=${PYTHON:-python3}

run() {  # run NAME SECONDS COMMAND...: output appended to $out/NAME.log
    local name=$1 limit=$2 start=$SECONDS
    shift 2
    echo "=== $name: $*" | tee -a "$out/$name.log"
    timeout "$limit" "$@" >>"$out/$name.log" 2>&1
    echo "=== $name: rc $? after $((SECONDS - start)) s" | tee -a "$out/$name.log"
}

{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    "$py" -c "import sys, torch; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
    nproc
} >"$out/env.txt" 2>&1
cat "$out/env.txt"

run tests 150 "$py" -m pytest -q -m "" -p no:cacheprovider -rs tests/gpu
run step_cost 60 "$py" benchmarks/step_cost.py --device cuda --steps 20 --repeats 7 \
    --reference-repeats 3
run step_cost_compiled 150 "$py" benchmarks/step_cost.py --device cuda --compiled \
    --models mlp transformer --sizes 1M 10M --steps 20 --repeats 7 --reference-repeats 0
run compiled_step 100 "$py" benchmarks/compiled_step.py --device cuda --quick
meta_out=$(mktemp -d)
run meta_train 50 "$py" -m metaopt.cli -vv meta-train --device cuda --out "$meta_out" \
    --steps 10 --val-every 10 --val-tasks 4 --no-progress
