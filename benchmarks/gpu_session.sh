#!/usr/bin/env bash
# The GPU checks of the fast engine (README: Performance, CUDA), prepared to run in one call on a
# lent GPU machine, whose Python (3.12, with PyTorch) lacks some of our dependencies and the data.
#
#   bash benchmarks/gpu_session.sh prepare     here, once: wheels and Fashion-MNIST into .gpu/ (git-ignored)
#   bash benchmarks/gpu_session.sh run         there, from the checkout's root, with .gpu carried along
#
# `run` installs the wheels into /tmp/site and this package, editable, into the machine's Python (a
# machine there starts bare and is given back after the session), then runs each check under its own time
# limit, so that one slow check cannot take the others' time (at most 9 minutes in all):
#   1. the CUDA-marked tests (graphs against eager, stacked against alone, CUDA against the CPU),
#   2. benchmarks/overhead.py --device cuda: eager, stacked and graphed rows against the bare loop,
#   3. the quickstart with --cuda-graphs, whose target on an H100 is under 8 s for its 9 runs.
# Each check's output goes to $OUT/<check>.log (or gpu-logs/ when OUT is unset); `run` exits 1 when a
# check failed or ran past its limit, after running the others. Not here: the Avalanche
# comparison (avalanche-lib and its dependencies would have to travel as wheels too).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

WHEELS="optuna==5.0.0 alembic==1.20.1 Mako==1.4.3 colorlog==6.12.0 SQLAlchemy==2.1.9 tomli_w==1.2.0 \
mlxtend==0.25.0 mnist1d==0.0.2.post1 quadprog==0.1.14 \
pytest==9.2.0 iniconfig==2.3.1 pluggy==1.7.0 packaging==26.4 Pygments==2.21.0"
FMNIST_DIR=/usr/share/datasets/fashion-mnist

prepare() {
    grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || { mkdir -p .git/info; echo '/.gpu/' >> .git/info/exclude; }
    mkdir -p .gpu/whl .gpu/fashion-mnist
    # shellcheck disable=SC2086
    "${PYTHON:-.venv/bin/python}" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .gpu/whl $WHEELS || { echo "gpu_session: error: pip download failed" >&2; exit 1; }
    cp "$FMNIST_DIR"/*.gz .gpu/fashion-mnist/ ||
        { echo "gpu_session: error: no Fashion-MNIST in $FMNIST_DIR; run bash bootstrap.sh test first" >&2; exit 1; }
    du -sh .gpu
    echo "prepared; on the GPU machine: run(command=\"bash benchmarks/gpu_session.sh run\", carry=[\".gpu\"], timeout_s=600)"
}

check() {  # NAME SECONDS COMMAND...: one check under its limit, its output in $LOGS/NAME.log
    local name=$1 limit=$2; shift 2
    echo "=== $name (limit ${limit}s): $*"
    local start=$SECONDS
    timeout "$limit" "$@" > "$LOGS/$name.log" 2>&1
    local rc=$?
    tail -n 25 "$LOGS/$name.log"
    echo "=== $name: exit $rc after $((SECONDS - start))s"
    [ "$rc" -eq 0 ] || FAILED="$FAILED $name"
}

run() {
    [ -d .gpu/whl ] || { echo "gpu_session: error: no .gpu/whl; run 'prepare' here first and carry .gpu" >&2; exit 1; }
    LOGS=${OUT:-gpu-logs} FAILED=""
    mkdir -p "$LOGS"
    export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .gpu/whl/*.whl || exit 1
    # Editable, as bootstrap.sh installs it: cl.strategies and cl.scenarios map to strategies/ and scenarios/.
    python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir -e . || exit 1
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 -c "import torch, cl; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
    check tests 240 python3 -m pytest -q -x -m cuda -p no:cacheprovider tests/
    check overhead 180 python3 benchmarks/overhead.py --device cuda --repeats 1 --stack 3 9 \
        --data-dir .gpu/fashion-mnist
    check quickstart 120 python3 -m cl.cli run experiments/quickstart.toml --device cuda --cuda-graphs \
        --data-dir .gpu/fashion-mnist --store sqlite:////tmp/gpu-quickstart.db --no-progress
    [ -z "$FAILED" ] || { echo "gpu_session: failed:$FAILED (logs in $LOGS)" >&2; exit 1; }
}

case "${1:-}" in
    prepare) prepare ;;
    run) run ;;
    *) echo "usage: bash benchmarks/gpu_session.sh prepare|run" >&2; exit 2 ;;
esac
