"""Flash dynamic-mask attention (Doge's top-k key-bias attention) as GPU Pallas kernels (Triton backend).

Same meaning as `wmjax.ops.dmattn.dynamic_mask_attention_reference` on the calls `supports` accepts, in O(L)
memory: a key-centric pre-pass gives each key one expiry row e_j (key j is kept by rows [j, e_j), the top-w
rule per row rewritten per key), the forward and dq kernels gather per query block only the keys still kept
(at most w + block_q per row block), and the dk/dv/d_bias kernel regroups keys by e_j. Backward via
`jax.custom_vjp` (dq, dk, dv, d_bias; the top-k choice is held constant, as in HF).

Conventions: ties at tau_i are all kept (as the reference); a row with no allowed key (a padding query)
outputs zeros (the reference: the uniform average). GQA is native (query heads of a group share k, v, bias and
the pre-pass). L <= w skips the pre-pass (plain causal + key bias).

Modules: `prepass` (sort, key-expiry kernel, per-query-block key lists, dk/dv key order), `forward` (forward
kernel + the key iteration shared with dq), `backward` (dq and dk/dv/d_bias kernels), `api` (`supports`,
custom_vjp wiring, padding), `config` (tile sizes / warps per head dim; `interpret` for CPU tests only).
"""

from .api import dynamic_mask_attention_pallas, prepare_mask, supports
from .config import DmattnConfig, default_config

__all__ = ["supports", "dynamic_mask_attention_pallas", "prepare_mask", "DmattnConfig", "default_config"]
