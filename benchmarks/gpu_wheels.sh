#!/usr/bin/env bash
# Run HERE (the CPU machine with PyPI), before a lent GPU call: downloads into .whl/ (ignored by git)
# the wheels that the GPU image lacks or has at other versions, for its Python 3.12.
# Then on the GPU machine: run tool with carry [".whl"] and command `bash benchmarks/gpu_checks.sh`.
set -euo pipefail
cd "$(dirname "$0")/.."
exclude=$(git rev-parse --git-path info/exclude)  # also right in a git worktree, where .git is a file
grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"
rm -rf .whl && mkdir .whl
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
           --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" -d .whl \
  transformers==5.24.0 tokenizers==0.23.3 peft==0.21.2 bitsandbytes==0.50.2 \
  'jsonargparse[signatures]==4.53.0' typeshed-client docstring-parser math-verify==0.9.0 latex2sympy2_extended antlr4-python3-runtime==4.13.2 \
  trl==1.16.0 datasets==4.8.5 'dill<0.4.2' 'multiprocess<0.70.20'
# trl (the `bench` extra, for benchmarks/trl_compare.py) needs datasets >= 4.7; 4.8.5 is the newest that still
# accepts huggingface-hub 1.x and pyarrow >= 21; dill and multiprocess are datasets' own pins.
du -sh .whl
