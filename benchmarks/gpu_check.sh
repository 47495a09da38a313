#!/usr/bin/env bash
# A GPU session's checks, each under its own time limit so that one hang does not cost
# the others; logs go to $OUT (the device tool's folder) or ./gpu_out.
#
#   bash benchmarks/gpu_check.sh correctness   # tests/gpu and 10 meta-steps, ~5 min
#   bash benchmarks/gpu_check.sh speed         # step costs, profiles, compiled steps, ~8 min
#   bash benchmarks/gpu_check.sh graphs        # the learned step in a CUDA graph, ~8 min
#
# Each part fits one 10-minute device call (the first H200 session, 2026-12-04, learned
# that everything at once does not: each compiled case compiles for 20-45 s there).
# Runs from the source tree (PYTHONPATH) with the machine's own torch: nothing installed.
set -u
if [[ ${1:-} != correctness && ${1:-} != speed && ${1:-} != graphs ]]; then
    echo "usage: bash benchmarks/gpu_check.sh correctness|speed|graphs" >&2
    exit 2
fi
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

case $1 in
correctness)
    run tests 300 "$py" -m pytest -q -m "" -p no:cacheprovider -rs tests/gpu
    meta_out=$(mktemp -d)
    run meta_train 60 "$py" -m metaopt.cli -vv meta-train --device cuda --out "$meta_out" \
        --steps 10 --val-every 10 --val-tasks 4 --no-progress
    ;;
speed)
    run step_cost 60 "$py" benchmarks/step_cost.py --device cuda --steps 20 --repeats 7 \
        --reference-repeats 0
    run step_cost 60 "$py" benchmarks/step_cost.py --device cuda --reference-only \
        --reference-repeats 3
    run step_profile 100 "$py" benchmarks/step_profile.py --device cuda --steps 5 --compiled
    run step_cost_compiled 150 "$py" benchmarks/step_cost.py --device cuda --compiled \
        --models mlp --sizes 1M 10M --steps 20 --repeats 7 --reference-repeats 0
    run compiled_step 100 "$py" benchmarks/compiled_step.py --device cuda --quick \
        --models mlp,cnn --no-meta
    ;;
graphs)  # the learned make_step test alone: it never finished within the shared limit
    learned_make_step="compiled_step_on_cuda_matches_eager and learned"
    run tests 150 "$py" -m pytest -q -m "" -p no:cacheprovider -rs tests/gpu \
        -k "not ($learned_make_step)"
    run tests 150 "$py" -m pytest -q -m "" -p no:cacheprovider -rs tests/gpu \
        -k "$learned_make_step"
    # compile=True only: the eager step makes new counter tensors at every step, so its
    # replay repeats the captured step (the script would leave its graph out anyway)
    run cuda_graph_step 240 "$py" benchmarks/cuda_graph_step.py --learned compiled \
        --sizes 1M 10M --steps 50 --repeats 7
    run step_profile 40 "$py" benchmarks/step_profile.py --device cuda --steps 5
    ;;
esac
