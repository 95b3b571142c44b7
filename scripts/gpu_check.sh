#!/usr/bin/env bash
# One prepared run on a lent GPU machine (no package index there), from the repo root:
#
#     bash scripts/gpu_check.sh          # the log and bench tables under $OUT (default /tmp/out)
#
# Everything goes to $OUT/log.txt (the device tool returns at most 8 files), bench tables to $OUT/bench_*.md.
# Needs .whl/ in the repo root: the wheels the machine lacks (diffusers, open_clip_torch, omegaconf, PyYAML, ftfy,
# wcwidth; pure Python or abi3), installed into /tmp/site without dependencies. Every step has its own timeout, cut
# to what is left of BUDGET_S (default 420 s: the whole script ends, summary included, within it), and the script
# goes on past a failure; ONLY="name ..." runs those steps alone. A normal run on an H200 takes a few minutes (the
# benchmark's models are built on the CPU; their GPU forwards take milliseconds).
set -u -o pipefail

OUT=${OUT:-/tmp/out}
BUDGET_S=${BUDGET_S:-420}
LOG="$OUT/log.txt"
mkdir -p "$OUT"
STEPS=()

step() {  # step NAME TIMEOUT_S COMMAND...: append to $LOG, record PASS / FAIL / TIMEOUT / SKIPPED
    local name=$1 limit=$2 start=$SECONDS rc status left=$((BUDGET_S - SECONDS - 10))
    shift 2
    if [[ -n "${ONLY:-}" && " $ONLY " != *" $name "* ]]; then return; fi  # ONLY="install bench_fp16 ...": a subset
    if ((left < 20)); then
        echo "=== $name: SKIPPED (the budget of ${BUDGET_S}s is spent)"
        STEPS+=("$(printf '%-22s %-16s %5d s' "$name" SKIPPED 0)")
        return
    fi
    ((limit > left)) && limit=$left
    echo "=== $name (timeout ${limit}s): $*" | tee -a "$LOG"
    echo "=== $name" >>"$LOG"
    timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
    case $rc in
        0) status=PASS ;;
        124 | 137) status=TIMEOUT ;;
        *) status="FAIL (exit $rc)" ;;
    esac
    echo "=== $name: $status in $((SECONDS - start)) s"
    STEPS+=("$(printf '%-22s %-16s %5d s' "$name" "$status" $((SECONDS - start)))")
}

install_wheels() {
    ls .whl/*.whl || return 1
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl && return 0
    echo "pip failed: unpacking the wheels instead (they are pure Python / abi3 zips)"
    python3 -c "import glob, zipfile; [zipfile.ZipFile(w).extractall('/tmp/site') for w in glob.glob('.whl/*.whl')]"
}

versions() {
    nvidia-smi -L
    python3 - <<'EOF'
import sys, torch
print("python", sys.version.split()[0], "| torch", torch.__version__, "| CUDA", torch.version.cuda,
      "| cuDNN", torch.backends.cudnn.version(), "| available", torch.cuda.is_available())
import diffusers, omegaconf, triton  # noqa: E401 -- the wheels and triton import
print("diffusers", diffusers.__version__, "| omegaconf", omegaconf.__version__, "| triton", triton.__version__)
if torch.cuda.is_available():
    print(torch.cuda.get_device_name(), torch.cuda.get_device_properties(0))
else:
    sys.exit("no CUDA device")
EOF
}

export -f install_wheels versions
step install 60 bash -c install_wheels
export PYTHONPATH=/tmp/site:$PWD
step versions 30 bash -c versions

# torch.distributed on the GPU: one process against two sharing the GPU through gloo, and the nccl exchange in a
# group of one (the tiny fixtures; bit-identical expected), then the x4 VAE decode's whole-map part against its tiles
export OMP_NUM_THREADS=4
step dist_one 60 python3 scripts/dist_check.py run /tmp/one.pt --device cuda
step dist_two 60 env SDUP_DIST_BACKEND=gloo python3 -m torch.distributed.run --standalone --nproc-per-node 2 \
    scripts/dist_check.py run /tmp/two.pt --device cuda
step dist_nccl 60 python3 scripts/dist_check.py run /tmp/nccl.pt --device cuda --nccl-world-one
step dist_compare 30 python3 scripts/dist_check.py compare /tmp/one.pt /tmp/two.pt /tmp/nccl.pt
step decode_time 90 python3 scripts/dist_check.py time-decode --device cuda --latent 256 512
unset OMP_NUM_THREADS

# the Triton kernel compiled for the GPU, the fixture UNet on CUDA, prepare on CUDA
step cuda_smoke 75 python3 scripts/cuda_smoke.py

# sdup vs diffusers on the GPU (random full-size weights, outputs checked to agree, interleaved timing)
step bench_fp16 150 python3 scripts/bench.py --device cuda --dtype fp16 --models ${BENCH_FP16:-x4-unet sd14-unet vae-f4-decode} \
    --runs 5 --markdown "$OUT/bench_fp16.md"
step bench_bf16 60 python3 scripts/bench.py --device cuda --dtype bf16 --models x4-unet --runs 5 \
    --markdown "$OUT/bench_bf16.md"
step bench_fp32 60 python3 scripts/bench.py --device cuda --dtype fp32 --models x4-unet --runs 5 \
    --markdown "$OUT/bench_fp32.md"

echo
echo "=== summary (logs in $OUT)"
printf '%s\n' "${STEPS[@]}" | tee -a "$LOG"
