"""The training loop: sharded jit train step, metrics, checkpoints, NaN guard, end-of-run sample."""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import os
import signal
import sys
import time
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from wmjax.checkpoint import CheckpointCorrupt, Checkpointer, abstract_like

from . import sharding as shd
from .config import ConfigError, TrainConfig, dump_yaml, to_dict
from .data import BatchIterator, PackedDataset, cached_token_file, expand_paths, open_token_file, source_files
from .optim import make_optimizer
from .tokenizer import Tokenizer, get_tokenizer


class TrainingDiverged(RuntimeError):
    """Loss or gradient norm became NaN/inf."""


def log0(*a, **k):
    if jax.process_index() == 0:
        print(*a, **k, flush=True)


# --------------------------------------------------------------------------------------------------------------
# model


def build_model_config(model_section: dict, vocab_size: Optional[int] = None, special: Optional[dict] = None):
    from wmjax.config import DogeConfig

    fields = dict(model_section)
    preset = fields.pop("preset", None)
    known = {f.name for f in dataclasses.fields(DogeConfig)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ConfigError(f"model: unknown DogeConfig field(s) {', '.join('model.' + u for u in unknown)}; "
                          f"known: {', '.join(sorted(known))}")
    if fields.get("vocab_size", None) == "tokenizer" or (not preset and "vocab_size" not in fields):
        if vocab_size is None:
            raise ConfigError("model.vocab_size is 'tokenizer' but no tokenizer is available")
        fields["vocab_size"] = vocab_size
    for k, v in (special or {}).items():
        fields.setdefault(k, v)
    try:
        if preset:
            return DogeConfig.preset(preset, **fields)
        return DogeConfig(**fields)
    except Exception as e:
        raise ConfigError(f"model: {e}") from None


def special_token_ids(ds, tok) -> dict:
    """The model's bos/eos/pad ids for a run from scratch: the data's document boundaries (``ds.bos_id`` /
    ``ds.eos_id``) and the tokenizer's pad (else the token files' ``pad_id``, else none). They replace a preset's
    ids (a preset names SmallDoge's tokenizer, not this run's); ``model.*_token_id`` set by the user win."""
    pad = tok.pad_id if tok is not None else ds.pad_id
    return {"bos_token_id": ds.bos_id, "eos_token_id": ds.eos_id, "pad_token_id": pad}


def check_special_token_ids(model_cfg, ds) -> None:
    """Refuse a pad id that is also a document boundary: the pad row of the embedding starts at zero, a document
    (or window) that starts with it has an all-zero hidden state in every layer (it attends only to itself), and
    RMSNorm's gradient at zero is 1/sqrt(rms_norm_eps) per norm: the gradient overflows with depth."""
    pad = model_cfg.pad_token_id
    for name, tid in (("bos", ds.bos_id), ("eos", ds.eos_id)):
        if pad is not None and pad == tid:
            raise ConfigError(
                f"model.pad_token_id={pad} is also the data's {name}_id: its embedding row is initialised to zero, "
                f"and a document starting with it makes the gradient overflow with depth; set model.pad_token_id "
                f"to an id the data does not use, or null")


def resolve_dtype(name: str):
    if name == "auto":
        return jnp.bfloat16 if jax.default_backend() in ("gpu", "tpu", "cuda", "rocm") else jnp.float32
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


def model_accepts(model_cls, arg: str) -> bool:
    try:
        return arg in inspect.signature(model_cls.__call__).parameters
    except (TypeError, ValueError):
        return False


# --------------------------------------------------------------------------------------------------------------
# loss / step


def _sum_sown(tree, name: str):
    total, found = 0.0, False
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if any(getattr(k, "key", None) == name for k in path):
            total = total + jnp.asarray(leaf, jnp.float32)
            found = True
    return total if found else None


LOSS_IMPLS = ("auto", "fused", "logits")


def choose_loss_impl(impl: str, model) -> str:
    """'fused' (wmjax.ops.cross_entropy: LM head + loss in sequence chunks, no [b, s, vocab] f32 logits) when
    the model can return its final hidden states, else 'logits' (the model's logits, then an f32 log-softmax)."""
    if impl not in LOSS_IMPLS:
        raise ConfigError(f"train.loss_impl: expected {'|'.join(LOSS_IMPLS)}, got {impl!r}")
    can = model_accepts(type(model), "return_hidden") and hasattr(type(model), "lm_head_weight")
    if impl == "fused" and not can:
        raise ConfigError("train.loss_impl=fused needs a model with return_hidden / lm_head_weight")
    if impl == "auto":
        return "fused" if can else "logits"
    return impl


def make_loss_fn(model, model_cfg, z_loss: float = 0.0, use_segments: bool = True, loss_impl: str = "auto",
                 chunk_tokens: int = 8192):
    """(params, micro-batch, denom, aux_weight) -> (loss, {ce_sum, aux, z_sum}).

    loss = sum(mask * CE) / denom (+ z_loss * sum(mask * lse^2) / denom) (+ MoE aux). Both loss paths compute
    the same function: compute-dtype logits (the model's), f32 log-softmax; ``fused`` never materialises them
    for the whole batch (see wmjax.ops.cross_entropy).
    """
    from wmjax.ops.cross_entropy import lm_head_cross_entropy

    is_moe = bool(getattr(model_cfg, "is_moe", False))
    aux_coef = float(getattr(model_cfg, "router_aux_loss_coef", 0.0)) if is_moe else 0.0
    impl = choose_loss_impl(loss_impl, model)
    fused = impl == "fused"

    def loss_fn(params, mb, denom, aux_weight=1.0):
        kwargs = {}
        if use_segments:
            kwargs["segment_ids"] = mb["segment_ids"]
            kwargs["positions"] = mb["positions"]
        if fused:
            kwargs["return_hidden"] = True
        if is_moe:
            kwargs["output_router_logits"] = True
            out, state = model.apply({"params": params}, mb["tokens"], mutable=["intermediates"], **kwargs)
            aux = _sum_sown(state.get("intermediates", {}), "router_aux_loss")
            aux = jnp.zeros((), jnp.float32) if aux is None else aux
        else:
            out = model.apply({"params": params}, mb["tokens"], **kwargs)
            aux = jnp.zeros((), jnp.float32)
        out = out[0] if isinstance(out, (tuple, list)) else out
        mask = mb["loss_mask"]
        with jax.named_scope("loss"):
            if fused:
                w, layout = type(model).lm_head_weight(model_cfg, params)
                obj, ce_sum, z_sum = lm_head_cross_entropy(out, w, mb["targets"], mask, z_coef=float(z_loss),
                                                           chunk_tokens=chunk_tokens, layout=layout)
                loss = obj / denom + aux_weight * aux_coef * aux
            else:
                logits = out.astype(jnp.float32)
                lse = jax.nn.logsumexp(logits, axis=-1)
                tgt = jnp.take_along_axis(logits, mb["targets"][..., None], axis=-1)[..., 0]
                ce_sum = jnp.sum((lse - tgt) * mask)
                z_sum = jnp.sum(jnp.square(lse) * mask)
                loss = ce_sum / denom + aux_weight * aux_coef * aux
                if z_loss:
                    loss = loss + z_loss * z_sum / denom
        return loss, {"ce_sum": ce_sum, "aux": aux, "z_sum": z_sum}

    loss_fn.impl = impl
    return loss_fn


def make_grad_fn(loss_fn, grad_accum: int, mesh=None, denom_axes=None):
    """(params, batch) -> (grads, metrics), accumulating over ``grad_accum`` micro-batches with lax.scan.

    The loss is normalised by the token count of the *whole* batch, so the accumulated gradient equals the
    full-batch gradient (up to summation order).
    """
    vg = jax.value_and_grad(loss_fn, has_aux=True)

    def grad_fn(params, batch):
        denom = jnp.sum(batch["loss_mask"])
        if denom_axes:  # inside shard_map: normalise by the token count of the global batch
            denom = jax.lax.psum(denom, denom_axes)
        denom = jnp.maximum(denom, 1.0)
        if grad_accum == 1:
            (loss, aux), grads = vg(params, batch, denom)
            ce, auxl, z = aux["ce_sum"], aux["aux"], aux["z_sum"]
        else:
            def split(x):
                b = x.shape[0]
                y = x.reshape(b // grad_accum, grad_accum, *x.shape[1:]).swapaxes(0, 1)
                if mesh is not None:
                    y = jax.lax.with_sharding_constraint(
                        y, NamedSharding(mesh, P(None, ("data", "fsdp"), *([None] * (x.ndim - 1)))))
                return y

            mbs = jax.tree_util.tree_map(split, batch)

            def body(carry, mb):
                g_acc, ce_acc, aux_acc, z_acc = carry
                (l, aux), g = vg(params, mb, denom, 1.0 / grad_accum)
                g_acc = jax.tree_util.tree_map(jnp.add, g_acc, g)
                return (g_acc, ce_acc + aux["ce_sum"], aux_acc + aux["aux"], z_acc + aux["z_sum"]), None

            zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
            z0 = jnp.zeros((), jnp.float32)
            (grads, ce, auxl, z), _ = jax.lax.scan(body, (zeros, z0, z0, z0), mbs)
            auxl = auxl / grad_accum  # the aux loss is the mean over micro-batches (its gradient too)
        ce_mean = ce / denom
        return grads, {"ce": ce_mean, "aux": auxl, "z": z / denom, "tokens": denom}

    return grad_fn


BATCH_AXES = ("data", "fsdp")


def make_shard_map_grad_fn(loss_fn, grad_accum: int, mesh, param_specs):
    """Data parallel / FSDP with ``jax.shard_map``: every device runs the model on its own rows only.

    GSPMD cannot partition custom calls that carry no sharding rule (the Pallas/Triton attention kernel is
    one): it all-gathers their operands and every device computes them for the whole batch.  Here the model
    runs per device on local arrays: params sharded over ``fsdp`` are all-gathered in, gradients are summed over
    ``data`` and reduce-scattered back over ``fsdp`` (ZeRO-3), and the loss is normalised by the global token
    count, so the result equals the global-batch gradient up to summation order.  Needs ``mesh.tensor == 1``.
    """
    from jax.sharding import PartitionSpec as P

    inner = make_grad_fn(loss_fn, grad_accum, mesh=None, denom_axes=BATCH_AXES)

    def fsdp_dim(spec):
        for d, a in enumerate(spec):
            if a == "fsdp" or (isinstance(a, tuple) and "fsdp" in a):
                return d
        return None

    dims = jax.tree_util.tree_map(fsdp_dim, param_specs, is_leaf=lambda x: isinstance(x, P))

    def local(params, batch):
        full = jax.tree_util.tree_map(
            lambda x, d: x if d is None else jax.lax.all_gather(x, "fsdp", axis=d, tiled=True), params, dims)
        with nn.logical_axis_rules(()):  # no sharding constraints on local arrays
            grads, m = inner(full, batch)

        def reduce(g, d):
            if d is None:
                return jax.lax.psum(g, BATCH_AXES)
            return jax.lax.psum_scatter(jax.lax.psum(g, "data"), "fsdp", scatter_dimension=d, tiled=True)

        grads = jax.tree_util.tree_map(reduce, grads, dims)
        m = {"ce": jax.lax.psum(m["ce"], BATCH_AXES), "z": jax.lax.psum(m["z"], BATCH_AXES),
             "aux": jax.lax.pmean(m["aux"], BATCH_AXES), "tokens": m["tokens"]}
        return grads, m

    bspec = P(BATCH_AXES)
    return jax.shard_map(local, mesh=mesh, in_specs=(param_specs, bspec), out_specs=(param_specs, P()),
                         check_vma=False)


def choose_spmd(mode: str, mesh, model_cfg) -> str:
    """'shard_map' for pure DP/FSDP of dense models on several devices (auto), else 'gspmd'.

    MoE stays on GSPMD: its aux loss is a nonlinear function of whole-batch router statistics and the HF
    router layout mixes tokens across batch rows, so per-device computation would change the math.
    """
    if mode == "auto":
        ok = mesh.shape["tensor"] == 1 and mesh.size > 1 and not getattr(model_cfg, "is_moe", False)
        return "shard_map" if ok else "gspmd"
    if mode == "shard_map":
        if mesh.shape["tensor"] != 1:
            raise ConfigError("train.spmd=shard_map needs mesh.tensor == 1 (use gspmd for tensor parallelism)")
        if getattr(model_cfg, "is_moe", False):
            raise ConfigError("train.spmd=shard_map is for dense models (MoE aux loss / HF router layout are "
                              "whole-batch); use gspmd")
    return mode


def build_grad_fn(loss_fn, grad_accum: int, mesh, param_sh, model_cfg, mode: str = "auto"):
    """-> (grad_fn, chosen mode)."""
    chosen = choose_spmd(mode, mesh, model_cfg)
    if chosen == "shard_map":
        specs = jax.tree_util.tree_map(lambda s: s.spec, param_sh)
        return make_shard_map_grad_fn(loss_fn, grad_accum, mesh, specs), chosen
    return make_grad_fn(loss_fn, grad_accum, mesh), chosen


NONFINITE = "nonfinite_grads"  # metrics key: [num param leaves] bool, a leaf's gradient has a non-finite norm


def nonfinite_param_names(params, flags, limit: int = 4) -> str:
    """'N of M parameters: a/b/kernel, ...' for the leaves whose flag is set, in forward order (layer index)."""
    paths = ["/".join(_path_key(p)) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    bad = [n for n, f in zip(paths, np.asarray(flags)) if f]

    def order(name):  # embedding, layers_0 .. layers_{L-1}, then the final norm / head
        parts = name.split("/")
        if "embed_tokens" in parts:
            return (-1, name)
        layer = next((int(q[7:]) for q in parts if q.startswith("layers_") and q[7:].isdigit()), 1 << 30)
        return (layer, name)

    bad.sort(key=order)
    more = f", ... (+{len(bad) - limit})" if len(bad) > limit else ""
    return f"{len(bad)} of {len(paths)} parameters, first {', '.join(bad[:limit])}{more}"


def make_train_step(grad_fn, tx, sched, model_cfg, z_loss: float):
    is_moe = bool(getattr(model_cfg, "is_moe", False))
    aux_coef = float(getattr(model_cfg, "router_aux_loss_coef", 0.0)) if is_moe else 0.0

    def train_step(state, batch):
        grads, m = grad_fn(state["params"], batch)
        with jax.named_scope("optimizer"):
            leaf_sq = [jnp.sum(jnp.square(g.astype(jnp.float32))) for g in jax.tree_util.tree_leaves(grads)]
            gnorm = jnp.sqrt(sum(leaf_sq))  # = optax.global_norm(grads)
            updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
            params = optax.apply_updates(state["params"], updates)
        loss = m["ce"] + aux_coef * m["aux"] + (z_loss * m["z"] if z_loss else 0.0)
        metrics = {"loss": loss, "ce": m["ce"], "aux": m["aux"], "grad_norm": gnorm, "lr": sched(state["step"]),
                   "tokens": m["tokens"], NONFINITE: ~jnp.isfinite(jnp.stack(leaf_sq))}
        new_state = {"params": params, "opt_state": opt_state, "step": state["step"] + 1, "rng": state["rng"]}
        return new_state, metrics

    return train_step


# --------------------------------------------------------------------------------------------------------------
# shardings of the train state


def _path_key(path) -> tuple:
    return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def opt_state_shardings(opt_shapes, params_shapes, param_sh, mesh):
    """Optimizer-state leaves that mirror a parameter get that parameter's sharding; the rest are replicated."""
    by_path = {}
    for (p, x), s in zip(jax.tree_util.tree_flatten_with_path(params_shapes)[0], jax.tree_util.tree_leaves(param_sh)):
        by_path[_path_key(p)] = (x.shape, s)
    rep = NamedSharding(mesh, P())

    def one(path, x):
        key = _path_key(path)
        for i in range(len(key)):
            hit = by_path.get(key[i:])
            if hit is not None and hit[0] == x.shape:
                return hit[1]
        return rep

    return jax.tree_util.tree_map_with_path(one, opt_shapes)


# --------------------------------------------------------------------------------------------------------------
# sampling


def sample_continuation(model, params, tok: Tokenizer, prompt: str, max_new: int, temperature: float, top_k: int,
                        rng, max_len: int):
    """Sample with ``wmjax.sampling.generate`` when it exists, else a small full-forward loop (no cache)."""
    ids = [tok.bos_id] + tok.encode(prompt)
    max_new = max(0, min(max_new, max_len - len(ids)))
    try:
        from wmjax import sampling as _sampling  # noqa: F401

        gen = getattr(_sampling, "generate", None)
    except Exception:
        gen = None
    if gen is not None:
        try:
            out = gen(model, params, [ids], max_new_tokens=max_new, temperature=temperature, top_k=top_k,
                      stop_tokens=[tok.eos_id], rng=rng, pad_id=tok.pad_id)
            n = int(np.asarray(out.lengths)[0])
            new = np.asarray(out.tokens)[0, :n].tolist()
            return prompt + tok.decode(_cut_eos(new, tok.eos_id)), "wmjax.sampling.generate"
        except Exception as e:  # fall back to the local loop
            log0(f"[sample] wmjax.sampling.generate failed ({type(e).__name__}: {e}); using the local loop")
    total = len(ids) + max_new
    buf = np.zeros((1, total), np.int32)
    buf[0, :len(ids)] = ids

    @jax.jit
    def step(params, buf, t, key):
        out = model.apply({"params": params}, buf)
        logits = (out[0] if isinstance(out, (tuple, list)) else out)[0].astype(jnp.float32)
        row = jax.lax.dynamic_index_in_dim(logits, t - 1, keepdims=False)
        if temperature <= 0:
            return jnp.argmax(row).astype(jnp.int32)
        row = row / temperature
        if top_k and top_k < row.shape[-1]:
            kth = jax.lax.top_k(row, top_k)[0][-1]
            row = jnp.where(row < kth, -jnp.inf, row)
        return jax.random.categorical(key, row).astype(jnp.int32)

    new = []
    for t in range(len(ids), total):
        rng, k = jax.random.split(rng)
        nxt = int(step(params, jnp.asarray(buf), t, k))
        if nxt == tok.eos_id:
            break
        buf[0, t] = nxt
        new.append(nxt)
    return prompt + tok.decode(new), "local full-forward sampling loop (wmjax.sampling not available)"


def _cut_eos(ids, eos):
    return ids[:ids.index(eos)] if eos in ids else ids


# --------------------------------------------------------------------------------------------------------------
# outputs


class MetricsWriter:
    def __init__(self, run_dir: str, tensorboard: bool, resume_step: int = 0):
        self.enabled = jax.process_index() == 0
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.tb = None
        if not self.enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        # keep only records up to the step we resume from (a killed run may have logged past its checkpoint)
        if os.path.exists(self.path):
            keep = []
            with open(self.path) as fh:
                for line in fh:
                    try:
                        if json.loads(line).get("step", 0) <= resume_step:
                            keep.append(line)
                    except json.JSONDecodeError:
                        pass
            with open(self.path, "w") as fh:
                fh.writelines(keep if resume_step > 0 else [])
        self.fh = open(self.path, "a")
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter

                self.tb = SummaryWriter(os.path.join(run_dir, "tb"), purge_step=resume_step + 1 if resume_step else None)
            except Exception as e:  # tensorboardX missing: keep JSONL only
                log0(f"[metrics] TensorBoard disabled ({type(e).__name__}: {e})")

    def write(self, rec: dict):
        if not self.enabled:
            return
        self.fh.write(json.dumps(rec) + "\n")
        if self.tb is not None:
            for k, v in rec.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(f"train/{k}", v, rec["step"])

    def flush(self):
        if self.enabled:
            self.fh.flush()
            if self.tb is not None:
                self.tb.flush()

    def close(self):
        if self.enabled:
            self.fh.close()
            if self.tb is not None:
                self.tb.close()


def plot_loss(run_dir: str) -> Optional[str]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return None
    steps, losses = [], []
    with open(path) as fh:
        for line in fh:
            r = json.loads(line)
            if "loss" in r:
                steps.append(r["step"])
                losses.append(r["loss"])
    if not steps:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, losses, lw=0.8, alpha=0.5, label="loss")
    if len(losses) >= 20:
        k = max(5, len(losses) // 50)
        sm = np.convolve(losses, np.ones(k) / k, mode="valid")
        ax.plot(steps[k - 1:], sm, lw=1.8, label=f"mean of {k}")
    ax.set_xlabel("step")
    ax.set_ylabel("train loss (nats/token)")
    ax.set_title(os.path.basename(os.path.abspath(run_dir)))
    ax.grid(alpha=0.3)
    ax.legend()
    out = os.path.join(run_dir, "loss.png")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


# --------------------------------------------------------------------------------------------------------------
# the run


@dataclasses.dataclass
class RunResult:
    final_step: int
    losses: dict
    run_dir: str
    sample: Optional[str] = None
    stopped: Optional[str] = None


def prepare_data(cfg: TrainConfig, log=log0):
    """-> (tokenizer or None, list of token files)."""
    d = cfg.data
    if d.source == "tokens":
        files = expand_paths(d.paths)
        tok_path = d.tokenizer.path
        if tok_path and not os.path.isfile(tok_path):
            raise FileNotFoundError(f"data.tokenizer.path: no such sentencepiece model: {tok_path}")
        if not tok_path:
            _, meta = open_token_file(files[0])
            tok_path = meta.get("tokenizer")
        tok = Tokenizer(tok_path) if tok_path and os.path.exists(tok_path) else None
        return tok, files
    data_files = None if d.tokenizer.corpus == "stdlib" else source_files(d)
    loader = None
    if d.source == "jsonl" and data_files:
        from .data import iter_texts

        def loader(f):
            return "\n".join(iter_texts("jsonl", [f], d.text_field))
    # only process 0 trains the tokenizer / tokenizes; the others wait for its files (shared filesystem)
    if jax.process_index() == 0:
        tok = get_tokenizer(d.tokenizer, data_files, loader, log=log)
        tf = cached_token_file(d, tok, log=log)
    _sync("tokenizer+data")
    tok = get_tokenizer(d.tokenizer, data_files, loader, log=lambda *a: None)
    tf = cached_token_file(d, tok, log=lambda *a: None)
    return tok, [tf]


def _sync(name: str):
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def move_aside(path: str) -> str:
    """Rename directory ``path`` to the first free name of ``<path>.prev``, ``<path>.prev2``, ... and return it.

    Nothing that exists is overwritten or deleted: every earlier run stays under its own name.
    """
    base = path.rstrip("/") + ".prev"
    dest, n = base, 1
    while os.path.lexists(dest):
        n += 1
        dest = f"{base}{n}"
    os.rename(path, dest)
    return dest


def run(cfg: TrainConfig, *, max_steps_this_run: Optional[int] = None) -> RunResult:
    t_start = time.time()
    shd.distributed_init(log=log0)
    tc, oc = cfg.train, cfg.optimizer
    run_dir = cfg.run_dir
    if os.path.exists(run_dir) and not os.path.isdir(run_dir):
        raise ConfigError(f"run_dir: {run_dir} exists and is not a directory")
    # the mesh first: a mesh the devices cannot hold fails before any tokenizer training
    mesh = shd.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    nb = mesh.shape["data"] * mesh.shape["fsdp"]
    micro = tc.global_batch_size // tc.grad_accum
    if micro % nb:
        raise ConfigError(f"train.global_batch_size/grad_accum = {micro} must be divisible by the batch mesh axes "
                          f"data*fsdp = {nb}")

    tok, token_files = prepare_data(cfg)
    try:
        ds = PackedDataset(token_files, cfg.data.seq_len, cfg.seed, cfg.data.shuffle, eos_id=cfg.data.eos_id,
                           bos_id=cfg.data.bos_id)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    model_cfg = build_model_config(cfg.model, tok.vocab_size if tok is not None else None,
                                   special_token_ids(ds, tok))
    check_special_token_ids(model_cfg, ds)
    if tok is not None and tok.vocab_size > model_cfg.vocab_size:
        raise ConfigError(f"model.vocab_size={model_cfg.vocab_size} is smaller than the tokenizer's "
                          f"{tok.vocab_size} pieces")

    from wmjax.models.doge import DogeForCausalLM, init_params, param_logical_axes
    from wmjax.random_init import fast_random_compile

    compute_dtype = resolve_dtype(tc.compute_dtype)
    param_dtype = resolve_dtype(tc.param_dtype)
    model_kw = {}
    if tc.remat:
        model_kw["remat"] = True
    if tc.attention_impl:
        model_kw["attention_impl"] = tc.attention_impl
    model = DogeForCausalLM(model_cfg, dtype=compute_dtype, param_dtype=param_dtype, **model_kw)
    use_segments = cfg.data.segment_ids and model_accepts(DogeForCausalLM, "segment_ids")
    if cfg.data.segment_ids and not use_segments:
        log0("[data] the model takes no segment_ids: packed documents attend across boundaries (plain causal)")

    data_it = BatchIterator(ds, tc.global_batch_size, jax.process_index(), jax.process_count())

    tx, sched = make_optimizer(oc, tc.steps)
    rng = jax.random.PRNGKey(cfg.seed)
    init_rng, state_rng = jax.random.split(rng)

    # shapes and shardings of the whole train state
    params_shapes = jax.eval_shape(lambda r: init_params(model_cfg, r, param_dtype=param_dtype), init_rng)
    axes = param_logical_axes(model_cfg)
    param_sh = shd.param_shardings(axes, params_shapes, mesh, warn=log0)
    opt_shapes = jax.eval_shape(tx.init, params_shapes)
    opt_sh = opt_state_shardings(opt_shapes, params_shapes, param_sh, mesh)
    rep = shd.replicated(mesh)
    state_sh = {"params": param_sh, "opt_state": opt_sh, "step": rep, "rng": rep}
    batch_sh = shd.batch_sharding(mesh)

    # Config, data, tokenizer and mesh are checked by now: only a start that got this far touches run_dir.  A
    # fresh run into a non-empty run dir moves the old run aside (never deleted, never mixed with the new one).
    if not cfg.resume and jax.process_index() == 0 and os.path.isdir(run_dir) and os.listdir(run_dir):
        prev = move_aside(run_dir)
        log0(f"[run] {run_dir} held a previous run: moved to {prev} (use --resume to continue a run)")
    _sync("run_dir")
    os.makedirs(run_dir, exist_ok=True)

    rules = shd.flax_rules()
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        def init_state(r):
            p = init_params(model_cfg, r, param_dtype=param_dtype)
            return {"params": p, "opt_state": tx.init(p), "step": jnp.zeros((), jnp.int32), "rng": state_rng}

        state_shapes = jax.eval_shape(init_state, init_rng)
        ckpt = Checkpointer(cfg.checkpoint_dir, cfg.checkpoint.keep, cfg.checkpoint.async_save, log=log0)
        abstract = abstract_like(state_shapes, state_sh)

        def last_good() -> str:  # for the stop message: the newest step that reads and passes its checksums
            ckpt.wait()
            try:
                good = ckpt.latest_good_step(abstract)
            except Exception as e:  # noqa: BLE001 - e.g. no memory to read it back next to the live state
                return f"step {ckpt.latest_step()} (not verified: {type(e).__name__})"
            return "none (no step passes its checks)" if good is None else f"step {good}"

        start_step = 0
        restored = None
        if cfg.resume:
            def check(state, meta):  # a step that disagrees with itself is corrupt; other data: ValueError
                if int(meta["step"]) != int(state["step"]):
                    raise CheckpointCorrupt(f"meta step {meta['step']} != state step {int(state['step'])}")
                data_it.restore(meta["data"])

            restored = ckpt.restore_latest_good(abstract, validate=check)
            if restored is None:
                log0(f"[run] --resume: no checkpoint in {cfg.checkpoint_dir}; starting from step 0")
        if restored is not None:
            start_step, state, meta = restored
            log0(f"[run] resumed from step {start_step} ({cfg.checkpoint_dir}); data position "
                 f"{data_it.samples_seen} samples")
        else:
            with fast_random_compile():  # threefry as one GPU kernel (wmjax.random_init)
                state = jax.jit(init_state, out_shardings=state_sh)(init_rng)
            data_it.samples_seen = 0

        n_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params_shapes))
        log0(f"[run] Doge {n_params / 1e6:.2f}M params (d={model_cfg.hidden_size}, layers={model_cfg.num_hidden_layers}, "
             f"vocab={model_cfg.vocab_size}{', MoE' if model_cfg.is_moe else ''}); mesh {dict(mesh.shape)} on "
             f"{jax.device_count()} {jax.default_backend()} device(s); compute {jnp.dtype(compute_dtype).name}, "
             f"params {jnp.dtype(param_dtype).name}; data {ds.num_tokens:,} tokens, {ds.num_windows:,} windows of "
             f"{cfg.data.seq_len}")
        if jax.process_index() == 0:
            with open(os.path.join(run_dir, "config.yaml"), "w") as fh:
                fh.write(dump_yaml(cfg))

        loss_fn = make_loss_fn(model, model_cfg, tc.z_loss, use_segments, tc.loss_impl, tc.loss_chunk_tokens)
        grad_fn, spmd = build_grad_fn(loss_fn, tc.grad_accum, mesh, param_sh, model_cfg, tc.spmd)
        if mesh.size > 1:
            log0(f"[run] data/fsdp parallelism through {spmd}")
        train_step = make_train_step(grad_fn, tx, sched, model_cfg, tc.z_loss)
        batch_sh_tree = {k: batch_sh for k in ("tokens", "targets", "segment_ids", "positions", "loss_mask")}
        step_fn = jax.jit(train_step, in_shardings=(state_sh, batch_sh_tree), out_shardings=(state_sh, rep),
                          donate_argnums=(0,))

        metrics_w = MetricsWriter(run_dir, tc.tensorboard, resume_step=start_step)
        kill_at = int(os.environ.get("WMJAX_DEBUG_SIGKILL_AFTER_CKPT", "0") or 0)
        end_step = tc.steps if max_steps_this_run is None else min(tc.steps, start_step + max_steps_this_run)
        tokens_per_step = tc.global_batch_size * cfg.data.seq_len

        pbar = None
        if tc.progress and jax.process_index() == 0:
            from tqdm.auto import tqdm

            pbar = tqdm(total=tc.steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True,
                        file=sys.stdout, mininterval=0.5)

        losses: dict[int, float] = {}
        pending: list = []  # (step, device metrics)
        last_t, last_step_timed = None, None
        stopped = None

        def flush_metrics():
            nonlocal last_t, last_step_timed
            if not pending:
                return
            host = jax.device_get([m for _, m in pending])
            now = time.time()
            tps = None
            if last_t is not None and pending[-1][0] > last_step_timed:
                tps = (pending[-1][0] - last_step_timed) * tokens_per_step / max(now - last_t, 1e-9)
            for (s, _), m in zip(pending, host):
                rec = {"step": s}
                rec.update({k: float(v) for k, v in m.items() if k != NONFINITE})
                if tps is not None:
                    rec["tokens_per_s"] = tps
                bad = not (math.isfinite(rec["loss"]) and math.isfinite(rec["grad_norm"]))
                if bad:
                    pending.clear()
                    metrics_w.flush()
                    raise TrainingDiverged(
                        f"non-finite {'loss' if not math.isfinite(rec['loss']) else 'gradient norm'} at step {s} "
                        f"(loss={rec['loss']}, grad_norm={rec['grad_norm']}; non-finite gradient in "
                        f"{nonfinite_param_names(state_shapes['params'], m[NONFINITE])}); stopping. The last good "
                        f"checkpoint is kept: {last_good()} in {cfg.checkpoint_dir}")
                losses[s] = rec["loss"]
                metrics_w.write(rec)
            if pbar is not None:
                last = host[-1]
                post = {"loss": f"{float(last['loss']):.3f}", "lr": f"{float(last['lr']):.2e}"}
                if tps is not None:
                    post["tok/s"] = f"{tps:,.0f}"
                pbar.set_postfix(post, refresh=False)
                pbar.update(pending[-1][0] - pbar.n)
            metrics_w.flush()
            last_t, last_step_timed = now, pending[-1][0]
            pending.clear()

        def save(step_no):
            meta = {"step": step_no, "data": data_it.state().to_json(), "config": to_dict(cfg),
                    "tokenizer": os.path.abspath(tok.path) if tok is not None else None,
                    "model_config": dataclasses.asdict(model_cfg)}
            ckpt.save(step_no, state, meta)

        try:
            step = start_step
            while step < end_step:
                local = next(data_it)
                batch = {k: jax.make_array_from_process_local_data(batch_sh, v) for k, v in local.items()}
                state, m = step_fn(state, batch)
                step += 1
                pending.append((step, m))
                if step == start_step + 1:
                    flush_metrics()  # includes compile time; the tokens/s clock starts here
                elif step % tc.log_every == 0 or step == end_step or step % cfg.checkpoint.every == 0:
                    flush_metrics()
                if step % cfg.checkpoint.every == 0 and step < end_step:
                    save(step)
                    if kill_at and step == kill_at:  # test hook: die hard right after this checkpoint is durable
                        ckpt.wait()
                        metrics_w.flush()
                        os.kill(os.getpid(), signal.SIGKILL)
            flush_metrics()
            if cfg.checkpoint.save_final and (step % cfg.checkpoint.every == 0 or step == end_step):
                if ckpt.latest_step() != step:
                    save(step)
            ckpt.wait()
        except TrainingDiverged as e:
            stopped = str(e)
            if pbar is not None:
                pbar.close()
                pbar = None
            log0(f"[run] STOPPED: {e}")
            ckpt.wait()
        finally:
            if pbar is not None:
                pbar.close()
            metrics_w.close()

        if stopped:
            ckpt.close()
            return RunResult(step, losses, run_dir, None, stopped)

        png = plot_loss(run_dir) if (tc.plot and jax.process_index() == 0) else None
        sample = None
        if tok is not None and tc.sample_tokens > 0:
            srng = jax.random.fold_in(state["rng"], step)
            params_host = state["params"]
            sample, how = sample_continuation(model, params_host, tok, tc.sample_prompt, tc.sample_tokens,
                                              tc.sample_temperature, tc.sample_top_k, srng,
                                              model_cfg.max_position_embeddings)
        ckpt.close()

    all_losses = _read_losses(os.path.join(run_dir, "metrics.jsonl"))
    if jax.process_index() == 0:
        ks = sorted(all_losses)
        summary = {"steps": step, "wall_s": round(time.time() - t_start, 1)}
        if len(ks) >= 200:
            summary["first100_mean"] = float(np.mean([all_losses[k] for k in ks[:100]]))
            summary["last100_mean"] = float(np.mean([all_losses[k] for k in ks[-100:]]))
        elif ks:
            summary["first_loss"], summary["last_loss"] = all_losses[ks[0]], all_losses[ks[-1]]
        with open(os.path.join(run_dir, "summary.json"), "w") as fh:
            json.dump(summary, fh, indent=1)
        log0(f"[run] done: {json.dumps(summary)}")
        log0(f"[run] outputs: {run_dir}/metrics.jsonl, {run_dir}/tb/, {png or '(no plot)'}, "
             f"checkpoints in {cfg.checkpoint_dir} (steps {_ckpt_steps(cfg.checkpoint_dir)})")
        if sample is not None:
            log0(f"[sample] ({how}; prompt {tc.sample_prompt!r}, T={tc.sample_temperature}, top_k={tc.sample_top_k}):")
            log0("-" * 60)
            log0(sample)
            log0("-" * 60)
    return RunResult(step, losses, run_dir, sample, None)


def _ckpt_steps(d):
    try:
        return sorted(int(x) for x in os.listdir(d) if x.isdigit())
    except OSError:
        return []


def _read_losses(path):
    out = {}
    if os.path.exists(path):
        with open(path) as fh:
            for line in fh:
                r = json.loads(line)
                if "loss" in r:
                    out[r["step"]] = r["loss"]
    return out
