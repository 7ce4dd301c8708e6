#!/bin/bash
# Device run: the unit-argument and unit-length tests on the GPU (tests/test_unit_arguments.py).
export PYTHONUNBUFFERED=1
nvidia-smi -L
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl > /dev/null 2>&1
PYTHONPATH=/tmp/site:$PWD timeout -s INT ${LIMIT:-400} python3 -m pytest -m cuda tests/test_unit_arguments.py \
  tests/test_unit_lengths.py ${K:+-k "$K"} -q -p no:cacheprovider -n 4 -rf 2>&1 | grep -vE "^\s*$" | cut -c1-1500 | tail -40
