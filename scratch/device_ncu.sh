#!/bin/bash
# Device run (one H100): ncu (full set, source counters) of the probe pass, the fused key-group
# probe and the block multiplier at Flux 1024² and SD3, against the plain call (NOTES.md 67).
export PYTHONPATH=$PWD:$PWD/scratch
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
echo "ncu: $NCU"
for case in "flux_1024 plain" "flux_1024 map" "flux_1024 iid" "flux_1024 mult" "sd3_1024 plain" "sd3_1024 map" "sd3_1024 iid"; do
  set -- $case
  tag=$1_$2
  timeout 240 $NCU --profile-from-start off --clock-control none --set full --import-source yes \
      -o $OUT/$tag -f python3 scratch/ncu_target.py $1 $2 > $OUT/$tag.log 2>&1
  echo "$tag rc=$? $(tail -1 $OUT/$tag.log)"
  $NCU --import $OUT/$tag.ncu-rep --page details > $OUT/${tag}_details.txt 2>&1
  $NCU --import $OUT/$tag.ncu-rep --page source --csv --print-source sass > $OUT/${tag}_sass.csv 2>&1
  rm -f $OUT/$tag.ncu-rep
  grep -E "^  [a-z_]+.*\(|Duration|Compute \(SM\) Throughput|Memory Throughput|Registers Per|Achieved Occupancy|Issue Slots Busy|No Eligible" $OUT/${tag}_details.txt | head -40
done
ls -la $OUT
