"""Bridges from other libraries' models to iidkern's policy door.

* :mod:`iidkern.integrations.diffusers`: ``use_iidkern(model, policy, backend)`` installs iidkern
  attention processors on diffusers' Flux, SD3 / SD3.5 and QwenImage transformers.

Submodules are imported on demand, so ``import iidkern`` never imports diffusers.
"""
