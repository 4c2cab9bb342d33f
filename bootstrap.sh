#!/usr/bin/env bash
# One entry point for a fresh clone:
#   bash bootstrap.sh demo          install everything, run experiments/quickstart.toml, write results/leaderboard/
#   bash bootstrap.sh test [ARGS]   install everything, run the test suite (pytest ARGS)
# It creates .venv inside the checkout if missing, installs the package with its
# dev and avalanche extras, and installs Fashion-MNIST through apt when its files are missing (and, for the tests,
# PostgreSQL, which the multi-machine sweep test starts on 127.0.0.1).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

FMNIST_DIR=/usr/share/datasets/fashion-mnist

find_python() {
    for candidate in "${PYTHON:-}" python3.11 python3 python; do
        [ -n "$candidate" ] || continue
        if command -v "$candidate" >/dev/null 2>&1 &&
           "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
            echo "$candidate"; return 0
        fi
    done
    echo "bootstrap: error: Python 3.11 or newer not found; install python3.11 (e.g. apt-get install python3.11 python3.11-venv)" >&2
    return 1
}

install_package() {
    if [ ! -x .venv/bin/python ]; then
        local py; py=$(find_python)
        echo "bootstrap: creating .venv with $py"
        "$py" -m venv .venv || { echo "bootstrap: error: '$py -m venv' failed; install the venv module (apt-get install python3-venv)" >&2; exit 1; }
    fi
    # Reinstall only when the package metadata changed (the install is editable).
    local stamp=.venv/.cl-installed digest
    digest=$(cat setup.cfg pyproject.toml | sha256sum | cut -d' ' -f1)
    if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$digest" ]; then
        echo "bootstrap: installing the package and its dependencies into .venv (first time: a few minutes)"
        .venv/bin/python -m pip install --disable-pip-version-check -q -e ".[dev,avalanche]"
        echo "$digest" > "$stamp"
    fi
}

fashion_mnist_present() {
    for f in train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte; do
        [ -f "$FMNIST_DIR/$f.gz" ] || [ -f "$FMNIST_DIR/$f" ] || return 1
    done
}

apt_install() {  # PACKAGE WHY: through apt, as root or with passwordless sudo; quietly does nothing otherwise
    local sudo=""
    if [ "$(id -u)" != 0 ]; then
        if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then sudo="sudo -n"; else return 1; fi
    fi
    command -v apt-get >/dev/null 2>&1 || return 1
    echo "bootstrap: installing $2 (Debian package $1)"
    $sudo apt-get update -qq && $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$1" >/dev/null
}

install_fashion_mnist() {
    fashion_mnist_present && return 0
    apt_install dataset-fashion-mnist Fashion-MNIST || true
    fashion_mnist_present && return 0
    echo "bootstrap: Fashion-MNIST not found in $FMNIST_DIR; run 'sudo apt-get install dataset-fashion-mnist'," \
         "or put the four IDX files in a folder and pass --data-dir DIR to cl run" >&2
    return 1
}

postgresql_present() {
    compgen -G "/usr/lib/postgresql/*/bin/pg_ctl" >/dev/null || command -v pg_ctl >/dev/null 2>&1
}

install_postgresql() {
    postgresql_present && return 0
    apt_install postgresql "PostgreSQL, for the multi-machine sweep test" || true
    postgresql_present
}

case "${1:-}" in
    demo)
        install_package
        install_fashion_mnist || exit 1
        .venv/bin/cl run experiments/quickstart.toml
        .venv/bin/cl leaderboard --out results/leaderboard
        echo "bootstrap: open results/leaderboard/index.html (or its README.md) to see the results"
        ;;
    test)
        shift
        install_package
        install_fashion_mnist || echo "bootstrap: the tests on the real Fashion-MNIST files will be skipped" >&2
        install_postgresql || echo "bootstrap: PostgreSQL could not be installed; its sweep test will be skipped" >&2
        exec .venv/bin/python -m pytest "$@"
        ;;
    *)
        echo "usage: bash bootstrap.sh demo | test [pytest args]" >&2
        exit 2
        ;;
esac
