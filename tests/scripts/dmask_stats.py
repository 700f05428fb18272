"""Test helper: does the dynamic mask (Doge's top-keep_window_size keys per row) remove keys on a given batch?

Imported by tests/test_train*.py and their subprocess workers (tests/scripts/ is put on sys.path). The key bias
of each layer is recomputed from the model's own dt_proj output (captured with flax ``capture_intermediates``)
and its A, as ``bias_j = exp(A * softplus(dt_j))``; the allowed keys of a packed batch are the causal keys of the
same document; the threshold is `pallas_kernels.dmattn.keep_threshold`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.dmattn import keep_threshold
from wmjax.models.doge import DogeForCausalLM


def mask_removal_stats(model_cfg, params, batch) -> list[dict]:
    """Per layer: {"rows_over_w": rows (batch row, query) with more than keep_window_size allowed keys,
    "finite_tau_rows" / "rows_trimmed": rows (batch row, bias head, query) with a finite threshold / with fewer
    kept keys than allowed keys, "max_allowed": most allowed keys of a row}.

    batch: "tokens", "positions", "segment_ids" [b, L] (train.data.pack); params: a DogeForCausalLM's."""
    model = DogeForCausalLM(model_cfg, dtype=jnp.float32, param_dtype=jnp.float32, attention_impl="reference")
    tokens, pos, seg = (jnp.asarray(batch[k]) for k in ("tokens", "positions", "segment_ids"))
    capture = jax.jit(lambda p: model.apply({"params": p}, tokens, positions=pos, segment_ids=seg,
                                            capture_intermediates=lambda mdl, method: mdl.name == "dt_proj",
                                            mutable=["intermediates"])[1])
    inter = capture(params)["intermediates"]["model"]
    allowed = (pos[:, None, :] <= pos[:, :, None]) & (seg[:, None, :] == seg[:, :, None])  # [b, Sq, Sk]
    n_allowed = np.asarray(allowed.sum(-1))[:, None, :]  # [b, 1, Sq]
    out = []
    for i in range(model_cfg.num_hidden_layers):
        dt = inter[f"layers_{i}"]["self_attn"]["dt_proj"]["__call__"][0]  # [b, L, hb]
        A = params["model"][f"layers_{i}"]["self_attn"]["A"]
        bias = jnp.exp(A.astype(jnp.float32) * jax.nn.softplus(dt.astype(jnp.float32))).transpose(0, 2, 1)
        tau = keep_threshold(bias, allowed[:, None], model_cfg.keep_window_size)  # [b, hb, Sq]
        kept = allowed[:, None] & (bias[:, :, None, :] >= tau[..., None])
        n_kept = np.asarray(kept.sum(-1))
        out.append({"rows_over_w": int((n_allowed > model_cfg.keep_window_size).sum()),
                    "rows_trimmed": int((n_kept < n_allowed).sum()),
                    "finite_tau_rows": int(np.isfinite(np.asarray(tau)).sum()),
                    "max_allowed": int(n_allowed.max())})
    return out


def assert_mask_removes_keys(model_cfg, params, batch):
    """Every layer has rows with more allowed keys than keep_window_size, a finite threshold and fewer kept keys
    than allowed ones (the top-k really fired)."""
    stats = mask_removal_stats(model_cfg, params, batch)
    for i, s in enumerate(stats):
        assert s["rows_over_w"] > 0 and s["finite_tau_rows"] > 0 and s["rows_trimmed"] > 0, (i, s)
    return stats
