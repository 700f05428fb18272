"""The training loop (`python -m train`): set up data, model, mesh and state (fresh or resumed), run the jitted
step with metrics, checkpoints and the NaN guard, then plot, sample and summarise.

The pieces: `train.model` (model config, dtypes), `train.loss`, `train.step` (gradients, optimizer update),
`train.metrics` (JSONL / TensorBoard / plot), `wmjax.checkpoint` (orbax checkpoints with checksums)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import sys
import time
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from wmjax.checkpoint import CheckpointCorrupt, Checkpointer, abstract_like
from wmjax.config import ConfigError
from wmjax.models.registry import family_of
from wmjax.random_init import fast_random_compile
from wmjax.sampling import generate
from wmjax.tokenizer import Tokenizer

from . import sharding as shd
from .config import TrainConfig, dump_yaml, to_dict
from .data import BatchIterator, PackedDataset, cached_token_file, expand_paths, iter_texts, open_token_file, source_files
from .loss import make_loss_fn
from .metrics import MetricsWriter, log0, model_flops_per_token, peak_flops, plot_loss, read_losses
from .model import build_model_config, check_special_token_ids, model_accepts, resolve_dtype, special_token_ids
from .optim import make_optimizer
from .step import NONFINITE, build_grad_fn, make_train_step, nonfinite_param_names
from .tokenizer import get_tokenizer


class TrainingDiverged(RuntimeError):
    """Loss or gradient norm became NaN/inf."""


@dataclasses.dataclass
class RunResult:
    final_step: int
    losses: dict
    run_dir: str
    sample: Optional[str] = None
    stopped: Optional[str] = None


def sample_continuation(model, params, tok: Tokenizer, prompt: str, max_new: int, temperature: float, top_k: int,
                        rng, max_len: int) -> str:
    """The end-of-run sample: BOS + ``prompt`` continued by `wmjax.sampling.generate` (stops at EOS)."""
    ids = [tok.bos_id] + tok.encode(prompt)
    max_new = max(0, min(max_new, max_len - len(ids)))
    out = generate(model, params, [ids], max_new_tokens=max_new, temperature=temperature, top_k=top_k,
                   stop_tokens=[tok.eos_id], rng=rng, pad_id=tok.pad_id)
    new = np.asarray(out.tokens)[0, :int(np.asarray(out.lengths)[0])].tolist()
    return prompt + tok.decode(new[:new.index(tok.eos_id)] if tok.eos_id in new else new)


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
        loader = lambda f: "\n".join(iter_texts("jsonl", [f], d.text_field))  # noqa: E731
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


    compute_dtype = resolve_dtype(tc.compute_dtype)
    param_dtype = resolve_dtype(tc.param_dtype)
    family = family_of(model_cfg)
    model_cls = family.model_cls
    model_kw = {}
    if tc.remat:
        model_kw["remat"] = True
    for impl in ("attention_impl", "ssd_impl", "scan_impl"):  # kernel choices, where the model has them
        if getattr(tc, impl):
            if impl not in getattr(model_cls, "__dataclass_fields__", {}):
                raise ConfigError(f"train.{impl}={getattr(tc, impl)!r}: the {family.name} model has no such "
                                  "implementation choice; leave it null")
            model_kw[impl] = getattr(tc, impl)
    model = model_cls(model_cfg, dtype=compute_dtype, param_dtype=param_dtype, **model_kw)
    use_segments = (cfg.data.segment_ids and model_accepts(model_cls, "segment_ids")
                    and getattr(model_cls, "accepts_segment_ids", True))
    if cfg.data.segment_ids and not use_segments:
        log0(f"[data] the {family.name} model takes no segment_ids: packed documents are read as one stream "
             "(no reset at document starts)")
    init_params, param_logical_axes = family.init_params, family.param_logical_axes

    data_it = BatchIterator(ds, tc.global_batch_size, jax.process_index(), jax.process_count())

    tx, sched = make_optimizer(oc, tc.steps)
    rng = jax.random.PRNGKey(cfg.seed)
    init_rng, state_rng = jax.random.split(rng)

    # shapes and shardings of the whole train state
    params_shapes = jax.eval_shape(lambda r: init_params(model_cfg, r, param_dtype=param_dtype), init_rng)
    axes = param_logical_axes(model_cfg)
    param_sh = shd.param_shardings(axes, params_shapes, mesh, warn=log0)
    opt_shapes = jax.eval_shape(tx.init, params_shapes)
    opt_sh = shd.opt_state_shardings(opt_shapes, params_shapes, param_sh, mesh)
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
        log0(f"[run] {n_params / 1e6:.2f}M params ({family.summary(model_cfg)}); mesh {dict(mesh.shape)} on "
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
        peak = peak_flops(jax.devices()[0])
        flops_tok = model_flops_per_token(model_cfg, n_params, cfg.data.seq_len)

        pbar = None
        if tc.progress and jax.process_index() == 0:

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
                    if peak:
                        rec["mfu"] = tps * flops_tok / (peak * jax.device_count())
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
                    "model_config": dataclasses.asdict(model_cfg), "model_family": family.name}
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
            how = "wmjax.sampling.generate"
            sample = sample_continuation(model, params_host, tok, tc.sample_prompt, tc.sample_tokens,
                                              tc.sample_temperature, tc.sample_top_k, srng,
                                              model_cfg.max_position_embeddings)
        ckpt.close()

    all_losses = read_losses(os.path.join(run_dir, "metrics.jsonl"))
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
        tb = f"{run_dir}/tb/, " if os.path.isdir(os.path.join(run_dir, "tb")) else ""
        log0(f"[run] outputs: {run_dir}/metrics.jsonl, {tb}{png or '(no plot)'}, "
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
