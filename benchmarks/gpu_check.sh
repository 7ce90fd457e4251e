#!/usr/bin/env bash
# Issue 15, item 4, in one run on a lent GPU machine: the CUDA tests of the merge engine,
# then the merge benchmark on the GPU and on that machine's CPU, side by side.
#
# On the device machine (its own Python, no uv, no network), from the repository root:
#   PYTHONPATH=src bash benchmarks/gpu_check.sh
# Its image lacks pydantic: carry the wheels of pydantic, pydantic-core, annotated-types and
# typing-inspection (see the device tool's README) and install them to a --target first.
# Logs go to $OUT (the device tool's folder that comes back), else benchmarks/.work/gpu.
# SIZE (1.1b), DEVICES ("cuda cpu") and METHODS (linear,ties,tsv_m,iso_c) override the run.
set -u -o pipefail
out=${OUT:-benchmarks/.work/gpu}
python=${PYTHON:-python3}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
"$python" -m pytest -q -p no:cacheprovider tests/test_merge.py tests/test_read_ahead.py 2>&1 | tee "$out/tests.txt"
for device in ${DEVICES:-cuda cpu}; do
    "$python" benchmarks/bench_merge.py --size "${SIZE:-1.1b}" --tools m3sb \
        --methods "${METHODS:-linear,ties,tsv_m,iso_c}" --device "$device" 2>&1 | tee "$out/bench-$device.txt"
done
