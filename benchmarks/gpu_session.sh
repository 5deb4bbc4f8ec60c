#!/usr/bin/env bash
# Every GPU check of this repository in one call on a lent GPU machine (see docs/benchmarks.md, "GPU session").
#
#   bash benchmarks/gpu_session.sh [BUDGET_S [gpu_all.py options, e.g. --only JOB,JOB]]
#                                                  # default 420 s of jobs; results -> $OUT/gpu_results.tgz
#
# The machine may lack some pure-Python dependencies (omegaconf, antlr4, pytest, ...). Wheels carried in
# .whl/ (an ignored folder; docs/benchmarks.md lists the command that fills it) are installed to /tmp/site
# first, without network and without touching the machine's own packages. Then benchmarks/gpu_all.py runs
# its plan within the budget, and its merged JSON and per-job logs are packed into one archive under $OUT
# (or /tmp when $OUT is unset).
set -u
budget="${1:-420}"
shift $(( $# > 0 ? 1 : 0 ))
out_root="${OUT:-/tmp}"
if compgen -G ".whl/*.whl" > /dev/null; then
    pipi=(python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site)
    if ! "${pipi[@]}" .whl/*.whl; then
        # e.g. a compiled wheel (kornia_rs) built for another Python: install the others one by one
        echo "wheel install failed; installing the wheels one at a time" >&2
        for w in .whl/*.whl; do "${pipi[@]}" "$w" || echo "skipped $w" >&2; done
    fi
    export PYTHONPATH="/tmp/site:${PWD}/src${PYTHONPATH:+:$PYTHONPATH}"
else
    export PYTHONPATH="${PWD}/src${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHON="${PYTHON:-python3}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
"$PYTHON" benchmarks/gpu_all.py --out /tmp/gpuout --budget-s "$budget" "$@"
rc=$?
tar czf "$out_root/gpu_results.tgz" -C /tmp gpuout
echo "gpu_all.py exit code $rc; results in $out_root/gpu_results.tgz"
exit $rc
