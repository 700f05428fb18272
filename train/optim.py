"""optax optimizer: AdamW (no decay on norms / biases / residual scales / A), WSD or cosine schedule, clipping."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import optax

from .sharding import path_str

# Parameters whose path matches this never get weight decay, whatever their rank.
NO_DECAY_RE = re.compile(r"(norm|bias|residual|scale|(^|/)A$|/A/|_A$)", re.IGNORECASE)


def make_schedule(cfg, total_steps: int):
    lr, warm = cfg.lr, int(cfg.warmup_steps)
    lo = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "constant":
        if warm == 0:
            return optax.constant_schedule(lr)
        return optax.join_schedules([optax.linear_schedule(0.0, lr, warm), optax.constant_schedule(lr)], [warm])
    if cfg.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, lr, max(warm, 0), max(total_steps, warm + 1), end_value=lo)
    # warmup-stable-decay: linear warmup, constant, then linear decay over the last decay_fraction of the steps
    decay = int(round(total_steps * cfg.decay_fraction))
    stable_end = max(warm, total_steps - decay)

    def wsd(step):
        step = jnp.asarray(step, jnp.float32)
        w = jnp.where(warm > 0, jnp.minimum(1.0, (step + 1) / max(warm, 1)), 1.0)
        frac = jnp.clip((step - stable_end) / max(decay, 1), 0.0, 1.0)
        d = 1.0 - (1.0 - cfg.min_lr_ratio) * frac
        return lr * jnp.where(step < warm, w, d)

    return wsd


def decay_mask(params):
    """True where weight decay applies: matrices/embeddings; False for norms, biases, residual scales, A."""

    def one(path, x):
        p = path_str(path)
        return bool(x.ndim >= 2 and not NO_DECAY_RE.search(p))

    return jax.tree_util.tree_map_with_path(one, params)


def make_optimizer(cfg, total_steps: int):
    sched = make_schedule(cfg, total_steps)
    parts = []
    if cfg.clip_norm and cfg.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(cfg.clip_norm))
    parts.append(optax.adamw(sched, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                             mask=decay_mask))
    return optax.chain(*parts), sched
