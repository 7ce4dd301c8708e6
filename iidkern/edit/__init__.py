"""Training-free editing methods as attention policies, plus their pipelines.

* :mod:`.iid` — IID (parallel multi-instruction editing): map capture at step S, masks,
  masked joint attention after S.
* :mod:`.headrouter` — HeadRouter: IARouter head routing, DTR image/text token refinement,
  key regions.
* :mod:`.inversion` — RF-Inversion controllers.
* :mod:`.masks` — maps -> masks (ReLU differencing, smoothing, Otsu) and mask pictures.
* :mod:`.pipeline` — end-to-end runs on the from-scratch runner (``iidkern.mmdit``).
"""
from .headrouter import HeadRouterConfig, HeadRouterPolicy, KeyRegionPolicy, TextResidual, dtr_weights
from .iid import BranchIsolationPolicy, IIDConfig, IIDMapPolicy, IIDMaskPolicy, IIDPolicy, default_map_step
from .inversion import InversionController, RFEditController, RFInversionConfig, invert
from .masks import binarize, disentangle_heads, gaussian_smooth, iid_masks, key_region_masks, otsu_threshold

__all__ = [
    "IIDConfig", "IIDPolicy", "IIDMapPolicy", "IIDMaskPolicy", "BranchIsolationPolicy", "default_map_step",
    "HeadRouterConfig", "HeadRouterPolicy", "KeyRegionPolicy", "TextResidual", "dtr_weights",
    "RFInversionConfig", "InversionController", "RFEditController", "invert",
    "disentangle_heads", "gaussian_smooth", "otsu_threshold", "binarize", "iid_masks", "key_region_masks",
]
