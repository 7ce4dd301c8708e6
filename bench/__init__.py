"""The iidkern benchmark suite (issue 5): pytest-benchmark tests, a renderer, a device script.

``python -m pytest bench/ --benchmark-only`` times iidkern against SDPA (cuDNN, flash,
efficient), FlexAttention and the naive materializing extraction; ``bench/gpu_run.sh``
is the one command the device machine runs; ``python -m bench.render`` writes RESULTS.md.
"""
