#!/usr/bin/env bash
# The wheels `python3 -m bench.gpu_proof` needs on the GPU machine, in .whl/ (git-ignored), under 64 MiB
# together with the working tree (what one run of the device tool carries).
#
# The GPU machine has torch, transformers, peft, accelerate and prometheus-client, with their own
# dependencies (numpy, pyyaml, psutil, safetensors, tokenizers, huggingface_hub, packaging, tqdm,
# fsspec, filelock, jinja2, …). Below is what kubetune's trainer imports beyond them, at the versions
# pinned in constraints.txt, for CPython $PY_VERSION on manylinux x86_64. PyPI has only an sdist of
# DeepSpeed: it is built here as a pure-Python wheel (DS_BUILD_OPS=0; its CPU Adam compiles on first
# use). bench/slim_wheels.py then drops what the proof never loads and recompresses with LZMA.
#
#   bench/gpu_wheels.sh                       # .whl/ for Python 3.12
#   PY_VERSION=3.11 DEST=/tmp/whl311 bench/gpu_wheels.sh
#
# On the GPU machine (no console script, no editable install: PYTHONPATH only):
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/gpu/site-packages .whl/*.whl
# The target's path must hold "site-packages": dill (datasets' fingerprints) pickles modules from
# anywhere else by value, and pyarrow's types cannot be (PicklingError: MonthDayNano).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
PY_VERSION=${PY_VERSION:-3.12}
DEST=${DEST:-.whl}
LIMIT_MIB=64

PACKAGES=(
  pydantic pydantic_core annotated-types typing-inspection          # kubetune_api's models
  datasets pyarrow pandas python-dateutil six tzdata dill multiprocess xxhash  # the data pipeline
  bitsandbytes                                                      # QLoRA
  einops hjson msgpack ninja py-cpuinfo                             # DeepSpeed's imports
  oras requests urllib3 certifi charset-normalizer                  # the OCI client (kubetune_trainer.oci)
  jsonschema jsonschema-specifications referencing rpds-py attrs    # oras' manifest schemas
)

pinned() {  # NAME==VERSION from constraints.txt (names compared with - and _ alike)
  local line
  line=$(grep -iE "^${1//[-_]/[-_]}==" constraints.txt | head -n 1)
  [[ -n "$line" ]] || { echo "gpu_wheels: $1 is not pinned in constraints.txt" >&2; exit 1; }
  echo "$line"
}

rm -rf "$DEST"
mkdir -p "$DEST"
requirements=()
for name in "${PACKAGES[@]}"; do requirements+=("$(pinned "$name")"); done
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version "$PY_VERSION" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  -d "$DEST" "${requirements[@]}"
DS_BUILD_OPS=0 "$PYTHON" -m pip wheel --quiet --no-deps --no-build-isolation -w "$DEST" "$(pinned deepspeed)"
"$PYTHON" bench/slim_wheels.py "$DEST"

wheels=$(du -sk "$DEST" | cut -f1)
tree=$(git ls-files -z | du -ck --files0-from=- | tail -n 1 | cut -f1)
echo "gpu_wheels: $(ls "$DEST" | wc -l) wheels, $((wheels / 1024)) MiB; with the working tree $(((wheels + tree) / 1024)) MiB of ${LIMIT_MIB}"
if (( wheels + tree > LIMIT_MIB * 1024 )); then
  echo "gpu_wheels: over the ${LIMIT_MIB} MiB a device run carries" >&2
  exit 1
fi
