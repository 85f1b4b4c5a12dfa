#!/usr/bin/env bash
# The GPU check, in one go and with no argument: the GPU-marked tests, then short training runs
# of the base preset (bf16, sequence 512, masked LM only) that report tokens/s and model-FLOPs
# utilization (MFU); a summary table is printed last.
#
#   bench/gpu_check.sh                          # on a machine with CUDA
#   GPU_CHECK_DEVICE=cpu bench/gpu_check.sh     # smoke run of this script on a CPU (tiny sizes)
#
# Every part runs under its own timeout and within an overall budget, and a failed part does
# not stop the next. Exit status 0 when every part that ran passed.
#
# Settings (environment variables):
#   GPU_CHECK_DEVICE   cuda (default) or cpu
#   GPU_CHECK_OUT      folder for logs and results (default: a new temporary folder)
#   GPU_CHECK_BUDGET   seconds for everything (default 600); parts that no longer fit are skipped
#   GPU_CHECK_COMPILE  1: add a run with --compile (default 1 on cuda, 0 on cpu)
#   GPU_CHECK_NPROC    processes for an FSDP run across GPUs (default: the GPU count; runs when >= 2)
set -euo pipefail
cd "$(dirname "$0")/.."

device="${GPU_CHECK_DEVICE:-cuda}"
out="${GPU_CHECK_OUT:-$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX")}"
budget="${GPU_CHECK_BUDGET:-600}"
python="${PYTHON:-$(command -v python || command -v python3)}"
mkdir -p "$out"
: >"$out/parts.tsv"
rm -f "$out"/[0-9]-*.json
export MINITURING_CACHE="${MINITURING_CACHE:-$out/cache}"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
start=$SECONDS
failures=0

record() { # name status seconds detail
    printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >>"$out/parts.tsv"
}

# part NAME LIMIT PATTERN COMMAND...: run COMMAND under a timeout (cut to what is left of the
# budget), log it to $out/NAME.log, and record its status with the last log line matching PATTERN.
part() {
    local name=$1 limit=$2 pattern=$3
    shift 3
    local left=$((budget - (SECONDS - start)))
    if ((left < 30)); then
        record "$name" skipped 0 "the ${budget}s budget is spent"
        return 0
    fi
    ((limit > left)) && limit=$left
    echo
    echo "== $name (at most ${limit}s): $*"
    local t0=$SECONDS rc status
    set +e +o pipefail
    timeout --kill-after=30 "$limit" "$@" 2>&1 | tee "$out/$name.log"
    rc=${PIPESTATUS[0]}
    set -e -o pipefail
    case $rc in
    0) status=ok ;;
    124 | 137) status="timeout (${limit}s)" ;;
    *) status="failed (exit $rc)" ;;
    esac
    [[ $rc == 0 ]] || failures=$((failures + 1))
    local detail
    detail=$(grep -E "$pattern" "$out/$name.log" | tail -n 1 | cut -c 1-100 || true)
    [[ $rc == 0 || -n $detail ]] || detail=$(grep -v '^\s*$' "$out/$name.log" | tail -n 1 | cut -c 1-100 || true)
    record "$name" "$status" $((SECONDS - t0)) "$detail"
}

finish() {
    "$python" -m bench.gpu_throughput --report "$out" || cat "$out/parts.tsv"
    echo
    echo "logs and results: $out"
    exit $((failures > 0))
}

# ---------------------------------------------------------------------------- environment
part environment 120 "GPU|CUDA" "$python" -c '
import torch
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.device_count()} GPU(s)")
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"  cuda:{i} {p.name}, {p.total_memory / 2**30:.0f} GiB")
'
if [[ $device == cuda* ]]; then
    ngpu=$("$python" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)
    if [[ $ngpu == 0 ]]; then
        record "gpu" failed 0 "no CUDA device visible to torch (GPU_CHECK_DEVICE=cpu for a CPU smoke run)"
        failures=$((failures + 1))
        finish
    fi
    sizes=()
    compile="${GPU_CHECK_COMPILE:-1}"
    nproc="${GPU_CHECK_NPROC:-$ngpu}"
    label="base bf16"
else
    sizes=(--tiny)
    compile="${GPU_CHECK_COMPILE:-0}"
    nproc="${GPU_CHECK_NPROC:-1}"
    label="tiny fp32 (cpu smoke)"
fi
bench=("$python" -m bench.gpu_throughput --device "$device" ${sizes[@]+"${sizes[@]}"})

# ---------------------------------------------------------------------------- tests
part gpu-tests 300 "passed|failed|skipped|error|no tests" \
    "$python" -m pytest -m gpu -q -rs -p no:cacheprovider tests/

# ---------------------------------------------------------------------------- throughput
part throughput 240 "tokens/s" \
    "${bench[@]}" --label "$label" --run-dir "$out/eager" --json "$out/1-eager.json"
if [[ $compile == 1 ]]; then
    part throughput-compiled 300 "tokens/s" \
        "${bench[@]}" --compile --label "$label, compiled" --run-dir "$out/compiled" \
        --json "$out/2-compiled.json"
fi
if ((nproc >= 2)); then
    part "throughput-fsdp-x$nproc" 240 "tokens/s" \
        "$python" -m torch.distributed.run --standalone --nproc_per_node "$nproc" \
        -m bench.gpu_throughput --device "$device" ${sizes[@]+"${sizes[@]}"} --strategy fsdp \
        --label "$label, FSDP x$nproc" --run-dir "$out/fsdp" --json "$out/3-fsdp.json"
fi

finish
