#!/usr/bin/env bash
# The wheels kernels/gpu_check.sh needs on the GPU machine beyond its image, into .whl/ (ignored by
# git), for CPython 3.12 on manylinux x86_64, the GPU image's Python. Run it where the package index
# is reachable, from the repository root:
#     bash kernels/gpu_wheels.sh
# then carry .whl to the GPU machine; gpu_check.sh installs .whl/*.whl into a scratch --target dir.
# Only the zero step needs them: DeepSpeed (0.19.8, as in the development environment) and what it
# requires that the image lacks (its Requires-Dist, less the image's einops, msgpack, ninja, numpy,
# packaging, psutil, py-cpuinfo, torch, tqdm): hjson, pydantic and pydantic's own needs.
# typing-extensions is in the image, but pydantic 2.14 needs >= 4.16, a version the image's may
# predate, so it travels too. About 5 MB in all.
# DeepSpeed is published as a source archive only: it is built here into a pure-Python wheel (no
# compiled ops; DeepSpeed builds any it needs at run time). Exactly one wheel per package must be in
# .whl/ (two versions stop the install there): an old one is named and refused.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
DEST=$ROOT/.whl
PY=${PYTHON:-$ROOT/.venv/bin/python}
[ -x "$PY" ] || PY=python3
BINARY=(
  hjson==3.1.0
  pydantic==2.14.4
  pydantic-core==2.50.5
  annotated-types==0.8.0
  typing-inspection==0.4.5
  typing-extensions==4.16.0
)
SOURCE=(deepspeed==0.19.8)

mkdir -p "$DEST"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$DEST" "${BINARY[@]}"
if ! compgen -G "$DEST/deepspeed-0.19.8-py3-none-any.whl" > /dev/null; then
  DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-cache-dir -w "$DEST" "${SOURCE[@]}"
fi

# one wheel per distribution, and every one of them a wanted version
declare -A seen=()
for wheel in "$DEST"/*.whl; do
  file=$(basename "$wheel")
  name=$(echo "${file%%-*}" | tr 'A-Z_.' 'a-z--')
  version=$(echo "$file" | cut -d- -f2)
  if [ -n "${seen[$name]:-}" ]; then
    echo "gpu_wheels: .whl/ holds two wheels of $name (${seen[$name]} and $version): remove the old one" >&2
    exit 1
  fi
  seen[$name]=$version
  if [[ ! " ${BINARY[*]} ${SOURCE[*]} " == *" $name==$version "* ]]; then
    echo "gpu_wheels: .whl/$file is not in this list (${BINARY[*]} ${SOURCE[*]}): remove it" >&2
    exit 1
  fi
done
echo "gpu_wheels: ${#seen[@]} wheels, $(du -ch "$DEST"/*.whl | tail -1 | cut -f1) in $DEST"
