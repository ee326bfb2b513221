#!/usr/bin/env bash
# Every GPU measurement of kdcache in one command, each step under a time limit so the whole run ends
# within 9 minutes on one GPU; the figures go into one results file.
#
#   bash benchmarks/gpu.sh [RESULTS_DIR]          # on a machine with a GPU (refuses without one)
#   bash benchmarks/gpu.sh --tiny [RESULTS_DIR]   # tiny sizes on any device: checks that every step runs
#
# Steps (scripts of this folder; each writes STEP.json and its printed table goes into results.md):
#   0. the readers (zarr, zarrs, tensorstore, kdcache's) against the decode bound at 1, 2 and every core
#                                                                             readers.py
#   1. precompute against the bare forward pass, float32 and --amp, for resnet32x4 and resnet8, each at its
#      best batch (the fastest bare forward of a sweep)                      precompute_throughput.py
#   2. distill step times in steady state (student, resident, cached, online) at batch 64 and 256
#                                                                             distill_step.py
#   3. DDP over every GPU of the machine (torchrun, NCCL) against one rank    distill_ranks.py
#   4. precompute on the GPU dask cluster, one worker per GPU, against serial precompute_workers.py
#
# RESULTS_DIR (default gpu-results-DATE-TIME) receives results.md and the JSON files. A step that fails or
# runs past its limit is recorded as such and the rest still run; the exit status is then 1.
# PYTHON (default: python) is the interpreter with kdcache installed.
set -uo pipefail

tiny=0
if [[ "${1:-}" == "--tiny" ]]; then tiny=1; shift; fi
if [[ "${1:-}" == -* ]]; then echo "usage: bash benchmarks/gpu.sh [--tiny] [RESULTS_DIR]" >&2; exit 2; fi
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
py="${PYTHON:-python}"
device="$("$py" -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")' 2>/dev/null)" || {
    echo "error: $py cannot import torch; set PYTHON to the interpreter that has kdcache installed" >&2; exit 2; }
if [[ $tiny == 0 && $device != cuda ]]; then
    echo "error: no GPU here (torch.cuda.is_available() is False); run 'bash benchmarks/gpu.sh --tiny' to check the steps on CPU" >&2
    exit 2
fi
out="${1:-gpu-results-$(date +%Y%m%d-%H%M%S)}"
mkdir -p "$out" || exit 2
out="$(cd "$out" && pwd)"

if [[ $tiny == 1 ]]; then
    # Seconds, not minutes: what a CI test can afford. The figures mean nothing; that every step runs does.
    archs=(resnet8)
    reader_args=(--samples 512 --threads 1 2 --rounds 1 --candidates zarr kdcache bound)
    pre_args=(--samples 64 --views 1 --rounds 1 --batch-size 32 64)
    step_args=(--teacher resnet8 --student resnet8 --samples 256 --batch-size 16 32 --rows camkd:spatial
               --rounds 1 --steps 2 --online-steps 1 --warmup 1 --reader-threads 1 2)
    rank_args=(--teacher resnet8 --student resnet8 --teachers 2 --samples 128 --batch-size 16 --epochs 1 --rounds 1)
    worker_args=(--arch resnet8 --samples 64 --views 1 --batch-size 64 --rounds 1 --workers 1)
    reader_limit=120 pre_limit=120 step_limit=240 rank_limit=120 worker_limit=120
else
    # Limits sum to 550 s (about 9 min) over the steps: 75 s the readers (3 spatial stores of 8,192 rows written,
    # then 18 fresh processes), 40 s a precompute run (x2 archs x2 precisions), 200 s distill steps (writing 6
    # stores of 50,000 rows is most of it), 50 s ranks, 65 s workers.
    archs=(resnet32x4 resnet8)
    reader_args=(--samples 8192 --forms spatial --threads 1 2 "$(nproc)" --rounds 1)
    pre_args=(--samples 8192 --views 2 --rounds 2 --batch-size 256 512 1024 2048)
    step_args=(--samples 50000 --batch-size 64 256 --rounds 2 --steps 100 --online-steps 20 --warmup 10)
    rank_args=(--samples 8192 --batch-size 256 --epochs 1 --rounds 2)
    worker_args=(--arch resnet8 --samples 8192 --views 4 --batch-size 1024 --rounds 2)
    reader_limit=75 pre_limit=40 step_limit=200 rank_limit=50 worker_limit=65
fi

results="$out/results.md"
failed=()
started=$SECONDS
{
    echo "# kdcache GPU suite$([[ $tiny == 1 ]] && echo ' (--tiny: sizes for a check, not figures)')"
    echo
    echo "- date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "- machine: $("$py" -c "import sys; sys.path.insert(0, '$here'); from common import machine; print(machine())")"
    echo "- device: $device; $(nproc) CPUs; git $(git -C "$here" rev-parse --short HEAD 2>/dev/null || echo unknown)"
} > "$results"

# step NAME LIMIT_S SCRIPT ARGS...: run one measurement under `timeout`, its output into results.md.
step() {
    local name="$1" limit="$2" script="$3"; shift 3
    local cmd=("$py" "$here/$script" "$@" --json "$out/$name.json")
    local t0=$SECONDS
    echo "== $name (limit ${limit} s)" >&2
    {
        echo
        echo "## $name"
        echo
        echo "\`python benchmarks/$script $*\`"
        echo
        echo '```'
    } >> "$results"
    timeout --kill-after=10 "$limit" "${cmd[@]}" >> "$results" 2>"$out/$name.stderr"
    local rc=$?
    echo '```' >> "$results"
    if [[ $rc == 0 ]]; then
        echo "($((SECONDS - t0)) s)" >> "$results"
        rm -f "$out/$name.stderr"
    else
        local why="exit status $rc"
        [[ $rc == 124 || $rc == 137 ]] && why="past its limit of ${limit} s"
        echo "**FAILED** ($why, after $((SECONDS - t0)) s); the end of its stderr:" >> "$results"
        { echo '```'; tail -n 20 "$out/$name.stderr"; echo '```'; } >> "$results"
        failed+=("$name")
        echo "   failed: $why (see $out/$name.stderr)" >&2
    fi
}

step readers "$reader_limit" readers.py "${reader_args[@]}"
for arch in "${archs[@]}"; do
    step "precompute-$arch-float32" "$pre_limit" precompute_throughput.py --arch "$arch" --device "$device" "${pre_args[@]}"
    step "precompute-$arch-amp" "$pre_limit" precompute_throughput.py --arch "$arch" --device "$device" --amp "${pre_args[@]}"
done
step distill-step "$step_limit" distill_step.py --device "$device" "${step_args[@]}"
step distill-ranks "$rank_limit" distill_ranks.py --device "$device" "${rank_args[@]}"
step precompute-workers "$worker_limit" precompute_workers.py --device "$device" "${worker_args[@]}"

{
    echo
    if [[ ${#failed[@]} == 0 ]]; then
        echo "All steps done in $((SECONDS - started)) s."
    else
        echo "Done in $((SECONDS - started)) s; FAILED: ${failed[*]}."
    fi
} >> "$results"
echo "results: $results ($((SECONDS - started)) s)" >&2
[[ ${#failed[@]} == 0 ]]
