#!/bin/bash
# Device run (one H100): the GPU suite on this tree, then the bench's probes paired over the
# plain call for this tree ("new") and the tree before scratch/kgnorm.patch ("old"), one
# process each, two interleaved rounds (NOTES.md 67).
SUITE_ONLY=1 bash scratch/device_suite.sh
rm -rf /tmp/old && cp -r . /tmp/old && (cd /tmp/old && patch -s -R -p1 < scratch/kgnorm.patch) || exit 1
for round in 1 2; do
  for tree in old new; do
    dir=$PWD; [ $tree = old ] && dir=/tmp/old
    (cd $dir && PYTHONPATH=$dir:$dir/scratch timeout 150 python3 scratch/probe_variant_ab.py TREE flux_1024,sd3_1024 2>&1 \
      | grep -E "TREE=|Error" | sed "s/TREE=0/$tree/")
  done
done
