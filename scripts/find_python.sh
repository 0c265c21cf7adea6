#!/usr/bin/env bash
# Print the path of a Python >= 3.12 found on this machine, or fail with a message saying how to get one.
# Order: $PYTHON, python3.13 / python3.12 / python3 on PATH, then the oldest pyenv version >= 3.12 (the GPU
# machines run 3.12).
set -u
ok() { "$1" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' >/dev/null 2>&1; }
for cand in ${PYTHON:-} python3.13 python3.12 python3; do
  p=$(command -v "$cand" 2>/dev/null) || continue
  if ok "$p"; then echo "$p"; exit 0; fi
done
if command -v pyenv >/dev/null 2>&1; then
  for v in $(pyenv versions --bare 2>/dev/null | grep -E '^3\.(1[2-9]|[2-9][0-9])(\.[0-9]+)?$' | sort -V); do
    p="$(pyenv prefix "$v" 2>/dev/null)/bin/python3"
    if ok "$p"; then echo "$p"; exit 0; fi
  done
fi
echo "realm-jax needs Python >= 3.12 (jax >= 0.11 requires it) and found none:" >&2
echo "  install one (e.g. 'pyenv install 3.12') or set PYTHON=/path/to/python3.12" >&2
exit 1
