"""Flash dynamic-mask attention (Doge's top-k key-bias attention) as GPU Pallas kernels (Triton backend).

O(L) memory: a key-centric pre-pass gives each key one expiry row e_j (key j is kept by rows [j, e_j)), the
forward and dq kernels gather per query block only the keys still kept (at most w + block_q per row block), and
the dk/dv kernel regroups keys by e_j. See `prepass`, `forward`, `backward`, and `api.supports` for the subset.
"""

from .api import dynamic_mask_attention_pallas, prepare_mask, supports
from .config import DmattnConfig, default_config

__all__ = ["supports", "dynamic_mask_attention_pallas", "prepare_mask", "DmattnConfig", "default_config"]
