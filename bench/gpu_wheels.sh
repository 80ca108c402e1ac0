#!/usr/bin/env bash
# Wheels the GPU machine lacks for bench/gpu_issue14.sh (it has torch, torchvision, timm, transformers, but no
# deepspeed, webdataset or simplejpeg; Python 3.12 there, no registry reachable). Run here, in the repo root:
#     bash bench/gpu_wheels.sh            # -> .whl/ (ignored through .git/info/exclude), about 10 MB
# then carry .whl in the device call (see bench/gpu_issue14.sh).
set -euo pipefail
OUT=${1:-.whl}
PY=${PY:-python3}
mkdir -p "$OUT"
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> "$(git rev-parse --git-path info/exclude)"
PLAT=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
      --platform manylinux_2_24_x86_64 --platform manylinux1_x86_64)
# binary wheels for CPython 3.12 (versions as pinned in this project's venv)
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${PLAT[@]}" -d "$OUT" \
    webdataset==1.0.2 braceexpand==0.1.7 hjson==3.1.0 simplejpeg pydantic==2.14.4 pydantic-core==2.50.5 \
    annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions
# deepspeed ships as an sdist: build its pure-Python wheel (no CUDA ops compiled; they JIT if ever needed)
ls "$OUT"/deepspeed-0.19.8-*.whl >/dev/null 2>&1 || \
    DS_BUILD_OPS=0 $PY -m pip wheel -q --no-deps --no-build-isolation -w "$OUT" deepspeed==0.19.8
ls -la "$OUT"
