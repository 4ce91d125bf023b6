#!/usr/bin/env bash
# Compatibility matrix on CPU (`make compat`): every supported stack runs the same checks.
#
#   torch2.11  torch 2.11 + triton 3.6 (tools/compat/torch2.11.txt) in build/compat/torch2.11, Python 3.12, the
#              package used from the tree (PYTHONPATH, no install), as on a GPU image
#   pins       today's pins (constraints.txt) in .venv (`make install`), the package installed in editable mode
#
# Checks in each: the Triton kernels' tests under the interpreter, the C++ kernels' tests, the ahead-of-time
# compile of one launch per kernel with every autotune config for sm_90 (fails on an error or a spill), and the
# recipe smoke tests. Summary: build/compat/compat.md. Exit status 1 if any check failed.
#
# Environment: COMPAT_ENVS (default "torch2.11 pins"), COMPAT_PYTHON (a Python 3.12 for torch2.11),
# COMPAT_FIND_LINKS (a folder of wheels pip may take torch from, e.g. one filled by `pip download`).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=$ROOT/build/compat
ENVS=${COMPAT_ENVS:-torch2.11 pins}
TESTS_TRITON=(tests/test_triton_kernels.py tests/test_fused_gemm.py)
TESTS_CPP=(tests/test_cpu_kernels.py tests/test_cpu_build.py)
TESTS_RECIPE=(tests/test_dreambooth.py)
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TORCH_EXTENSIONS_DIR=$OUT/torch_extensions
SUMMARY=$OUT/compat.md
printf '| stack | torch | triton | check | result | seconds |\n|---|---|---|---|---|---:|\n' >"$SUMMARY"
FAILED=0

python312() {
  local cand
  for cand in ${COMPAT_PYTHON:-} python3.12 "$HOME"/.pyenv/versions/3.12*/bin/python3.12; do
    if [ -n "$cand" ] && "$cand" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
      echo "$cand"
      return
    fi
  done
  echo "compat: no Python 3.12 found (set COMPAT_PYTHON)" >&2
  return 1
}

make_torch211() {
  local venv=$OUT/torch2.11
  [ -f "$venv/.installed" ] && return 0
  rm -rf "$venv"
  "$(python312)" -m venv "$venv" || return 1
  "$venv/bin/python" -m pip install -q ${COMPAT_FIND_LINKS:+--find-links "$COMPAT_FIND_LINKS"} \
    -c tools/compat/torch2.11.txt torch triton numpy transformers accelerate huggingface_hub safetensors diffusers \
    peft pillow tqdm matplotlib pytest hypothesis ninja || return 1
  touch "$venv/.installed"
}

check() {  # stack python name command...
  local stack=$1 py=$2 name=$3
  shift 3
  local log=$OUT/$stack/$name.log start=$SECONDS result=pass
  mkdir -p "$OUT/$stack"
  echo "== $stack: $name"
  if ! "$@" >"$log" 2>&1; then
    result=FAIL
    FAILED=1
  fi
  tail -n 3 "$log"
  local versions
  versions=$("$py" -c 'import torch, triton; print(torch.__version__, triton.__version__, sep="|")' 2>/dev/null)
  printf '| %s | %s | %s | %s | %s |\n' "$stack" "${versions:-?|?}" "$name" "$result" $((SECONDS - start)) >>"$SUMMARY"
}

run_stack() {  # stack python [PYTHONPATH]
  local stack=$1 py=$2 path=${3:-}
  local pytest=(env ${path:+PYTHONPATH=$path} "$py" -m pytest -q -p no:cacheprovider -m "not slow and not gpu")
  check "$stack" "$py" triton-interpreter "${pytest[@]}" "${TESTS_TRITON[@]}"
  check "$stack" "$py" cpp-kernels "${pytest[@]}" "${TESTS_CPP[@]}"
  check "$stack" "$py" aot-sm90 env -u TRITON_INTERPRET ${path:+PYTHONPATH=$path} "$py" -m tools.aot \
    --subset default --targets sm_90 --csv "$OUT/$stack/aot_sm90.csv" --quiet
  check "$stack" "$py" recipe-smoke "${pytest[@]}" "${TESTS_RECIPE[@]}"
}

START=$SECONDS
for stack in $ENVS; do
  case $stack in
    torch2.11)
      if make_torch211; then
        run_stack torch2.11 "$OUT/torch2.11/bin/python" "$ROOT"
      else
        printf '| torch2.11 | ? | ? | install | FAIL | |\n' >>"$SUMMARY"
        FAILED=1
      fi
      ;;
    pins)
      make install >/dev/null && run_stack pins "$ROOT/.venv/bin/python"
      ;;
    *) echo "compat: unknown stack $stack" >&2 && exit 2 ;;
  esac
done
echo "total: $((SECONDS - START)) s" >>"$SUMMARY"
cat "$SUMMARY"
exit $FAILED
