#!/usr/bin/env bash
# Fills a folder of wheels (default .whl/, git-ignored) with the pure-Python packages a GPU image typically lacks,
# for `make gpu-check` on a machine with no network. Run it on a networked machine, from the repository root:
#
#   tools/fetch_wheels.sh [DIR]
#
# then copy DIR with the tree. gpu-check installs from it (`pip install --no-index --no-deps --target <scratch>`)
# only the distributions the interpreter lacks, and names any that are still missing.
#
# The set: diffusers and the one requirement of it a torch + transformers image lacks (importlib_metadata; the
# others, huggingface_hub >= 1.32, filelock, numpy, regex, requests, safetensors >= 0.8, Pillow, zipp, come
# with transformers), and bayesian-torch (the benchmarks' baseline; installed without its torchvision /
# tensorboard / scikit-learn requirements, which its layers do not import). About 5 MB.
set -euo pipefail
DIR=${1:-.whl}
PACKAGES=(diffusers==0.42.1 importlib_metadata==8.7.1 bayesian-torch==0.5.0)
mkdir -p "$DIR"
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation py \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform any -d "$DIR" "${PACKAGES[@]}"
ls -l "$DIR"
