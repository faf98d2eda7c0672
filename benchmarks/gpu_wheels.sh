#!/usr/bin/env bash
# Run HERE (the development machine, with internet to PyPI) before benchmarks/gpu_check.sh: the GPU
# machine reaches nothing, and its image lacks DeepSpeed and DeepSpeed's pydantic/hjson, so their
# wheels (for its Python 3.12) and the Beauty files travel with the working tree, in ignored folders.
#   bash benchmarks/gpu_wheels.sh
# then, through the device tool, from the repo root:
#   run(command="bash benchmarks/gpu_check.sh", carry=[".whl", ".gpu-data"], timeout_s=540)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
for ignored in /.whl/ /.gpu-data/; do
  grep -qxF "$ignored" .git/info/exclude 2>/dev/null || echo "$ignored" >> .git/info/exclude
done
rm -rf .whl && mkdir -p .whl .gpu-data/amazon2014-beauty
DS_VERSION=$("$PY" -c "import deepspeed; print(deepspeed.__version__)" 2>/dev/null | tail -1)
# DeepSpeed ships only a source distribution: build its pure-Python wheel (ops compile at run time).
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation "deepspeed==$DS_VERSION" -w .whl
PLATFORMS=""
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do
  PLATFORMS="$PLATFORMS --platform $p"
done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $PLATFORMS -d .whl \
  "pydantic==$("$PY" -c 'import pydantic; print(pydantic.VERSION)')" \
  "pydantic-core==$("$PY" -c 'import pydantic_core; print(pydantic_core.__version__)')" \
  hjson annotated-types typing-inspection
cp "${RPG_DATA_DIR:-../shared/data}/amazon2014-beauty/"{sequences.txt,items.jsonl} .gpu-data/amazon2014-beauty/
du -sh .whl .gpu-data
