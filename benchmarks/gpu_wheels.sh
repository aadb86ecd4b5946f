#!/usr/bin/env bash
# Run HERE (the CPU machine with PyPI), before a lent GPU call: downloads into .whl/ (ignored by git)
# the wheels that the GPU image lacks or has at other versions, for its Python 3.12.
# Then on the GPU machine: run tool with carry [".whl"] and command `bash benchmarks/gpu_checks.sh`.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
rm -rf .whl && mkdir .whl
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
           --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" -d .whl \
  transformers==5.24.0 tokenizers==0.23.3 peft==0.21.2 bitsandbytes==0.50.2 \
  'jsonargparse[signatures]==4.53.0' typeshed-client docstring-parser math-verify==0.9.0 latex2sympy2_extended antlr4-python3-runtime==4.13.2
du -sh .whl
