#!/usr/bin/env bash
# Run the test suite against (1) the newest releases of every dependency and (2) the oldest supported
# transformers, each in its own fresh venv, so a breaking release is found by a command, not by users.
#   bash scripts/test_versions.sh            # both
#   bash scripts/test_versions.sh newest     # one of: newest, oldest, pinned
# Prints one line per variant with the versions and pytest's closing line; exit 1 if any variant fails.
set -uo pipefail
cd "$(dirname "$0")/.."
OLDEST_TRANSFORMERS="${OLDEST_TRANSFORMERS:-$(sed -n 's/.*"transformers>=\([0-9.]*\).*/\1/p' pyproject.toml)}"
OLDEST_PEFT="${OLDEST_PEFT:-$(sed -n 's/^test = .*"peft>=\([0-9.]*\)".*/\1/p' pyproject.toml)}"  # newer PEFT needs newer transformers
variants=("${@:-newest oldest}")
read -r -a variants <<< "${variants[*]}"
status=0
summary=()
for v in "${variants[@]}"; do
  venv=".venv-$v"
  rm -rf "$venv" && python3 -m venv "$venv"
  pip="$venv/bin/python -m pip install -q"
  $pip --upgrade pip
  $pip torch==2.13.0                       # the CPU wheel; a plain `torch` would pull a CUDA build
  case "$v" in
    newest) $pip --upgrade -e ".[test]" ;;
    oldest) $pip -e ".[test]" "transformers==$OLDEST_TRANSFORMERS" "peft==$OLDEST_PEFT" ;;
    pinned) $pip -c constraints.txt -e ".[test]" ;;
    *) echo "unknown variant $v (newest, oldest, pinned)"; exit 2 ;;
  esac
  vers=$("$venv/bin/python" -c "import torch, transformers, tokenizers; print(f'torch {torch.__version__}, transformers {transformers.__version__}, tokenizers {tokenizers.__version__}')")
  log="$venv/pytest.log"
  HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 "$venv/bin/python" -m pytest tests -p no:cacheprovider > "$log" 2>&1
  rc=$?
  [ $rc -ne 0 ] && status=1
  summary+=("$v: $vers -> $(tail -n 1 "$log") (exit $rc)")
done
printf '%s\n' "${summary[@]}"
exit $status
