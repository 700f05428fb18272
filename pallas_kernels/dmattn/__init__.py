"""Flash dynamic-mask attention (Doge's top-k key-bias attention): GPU Pallas kernels (Triton backend) and the
plain-jnp definition they compute.

Modules: `reference` (the definition: threshold, masked softmax, O(L^2) attention), `prepass` (sort, key-expiry
kernel, per-query-block key lists, dk/dv key order), `forward` (forward kernel + the key iteration shared with dq),
`backward` (dq and dk/dv/d_bias kernels), `ops` (`supports`, custom_vjp wiring, padding), `config` (the static
tile/warp configuration), `tuning` (the tuned defaults and the benchmarks' override hook). The algorithm, its
conventions and the measured figures: docs/KERNELS.md, Dynamic mask attention.
"""

from pallas_kernels.dmattn.config import DmattnConfig
from pallas_kernels.dmattn.ops import dynamic_mask_attention_pallas, prepare_mask, supports
from pallas_kernels.dmattn.reference import (dynamic_mask_attention_reference, dynamic_mask_softmax,
                                             keep_threshold)
from pallas_kernels.dmattn.tuning import default_config

__all__ = ["supports", "dynamic_mask_attention_pallas", "prepare_mask", "DmattnConfig", "default_config",
           "dynamic_mask_attention_reference", "dynamic_mask_softmax", "keep_threshold"]
