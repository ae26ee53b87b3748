#!/usr/bin/env bash
# Run here, where PyPI is reachable, before benchmarks/gpu.sh runs on a
# device machine (which reaches nothing): downloads into .whl/ (ignored by
# git; name it in the device run's `carry`) the wheels calm_jax imports that
# the device image lacks, at the versions of this checkout's .venv, and
# flax, optax and orbax-checkpoint at ours too (pure Python; the image's
# own are of unknown versions). The image brings jax with its CUDA plugin
# (0.11.x where ours is 0.10.x), numpy, torch and transformers
# (/work/.library/device/KINDS.md).
#
#   bash benchmarks/gpu_wheels.sh [DEST]   # DEST defaults to .whl
set -euo pipefail
cd "$(dirname "$0")/.."
dest=${1:-.whl}
grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
names='array_record grain ml_collections tensorflow-datasets
  tensorflow-metadata googleapis-common-protos immutabledict promise toml
  dm-tree simple-parsing docstring-parser termcolor portpicker tensorboardX
  flax optax orbax-checkpoint'
if [ ! -x .venv/bin/python ]; then
  echo "FATAL .venv: no virtual environment here to pin the wheels to; make it" \
    "first: python3 -m venv .venv && .venv/bin/pip install -e '.[test]'" >&2
  exit 1
fi
pins=$(.venv/bin/python -m pip freeze 2>/dev/null | python3 -c '
import re, sys
norm = lambda n: re.sub("[-_.]+", "-", n).lower()
want = {norm(n) for n in sys.argv[1:]}
found = {}
for line in sys.stdin:
  name = norm(line.split("==")[0])
  if name in want:
    found[name] = line.strip()
missing = sorted(want - set(found))
if missing:
  sys.exit("FATAL .venv: " + ", ".join(missing) + " not installed there; "
           "run .venv/bin/pip install -e \".[test]\" first")
print("\n".join(found.values()))' $names)
mkdir -p "$dest"
# The device's python3 is 3.12 on x86-64.
plat=''
for n in 17 24 27 28 31 34; do plat="$plat --platform manylinux_2_${n}_x86_64"; done
for pin in $pins; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp $plat --platform manylinux2014_x86_64 \
    --platform any -d "$dest" "$pin" 2>/dev/null \
  || python3 -m pip wheel -q --no-deps -w "$dest" "$pin"  # sdist only
done
ls "$dest"
du -sh "$dest"
