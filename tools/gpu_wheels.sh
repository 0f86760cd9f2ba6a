#!/bin/sh
# Wheels for a CUDA machine without network whose python already holds CUDA torch (docs/gpu.md):
# DeepSpeed (pure Python with DS_BUILD_OPS=0; its ops are JIT-built there if used) and the packages it needs that
# such images often lack, at the versions this environment uses. Usage: sh tools/gpu_wheels.sh DIR
# (GPU_WHEEL_PYTHON: the target's python version, default 3.12; PY: this environment's python).
# There: pip install --no-index --no-deps --target /tmp/site DIR/*.whl && PYTHONPATH=/tmp/site:. python3 ...
set -eu
out=${1:-.whl}
py=${PY:-python3}
target=${GPU_WHEEL_PYTHON:-3.12}
deepspeed=${DEEPSPEED_SPEC:-deepspeed==0.19.8}
mkdir -p "$out"
version() { "$py" -m pip show "$1" 2>/dev/null | sed -n 's/^Version: //p'; }
DS_BUILD_OPS=0 "$py" -m pip wheel --quiet --no-deps --no-build-isolation "$deepspeed" -w "$out"
for package in hjson pydantic pydantic_core annotated-types typing-inspection; do
    v=$(version "$package")
    [ -n "$v" ] || { echo "gpu_wheels: $package is not installed here (run make venv first)" >&2; exit 2; }
    "$py" -m pip download --quiet --no-deps --only-binary=:all: --python-version "$target" --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$out" "$package==$v"
done
ls -1 "$out"
