"""Pallas (Triton backend) kernels of the Mamba-1 selective scan, forward and backward (glue: ``ops.py``).

Grid (batch row, block of BE channels, part): a part is cpp consecutive chunks of T tokens, and a program loops over
its part's chunks (a ``fori_loop``: one ``scf.for``, no unrolled tokens), carrying the block's state f32 from chunk
to chunk. The state axis is split n = n1 N2 + n2 and every tile is [T, N1, BE, N2]: Triton's default layout puts
N2 on lanes and T, N1 inside a thread, so sums over the state are mostly adds in a thread (``tuning.py``). Inside
a chunk the recurrence is an associative scan over T (``linear_scan``: Triton's ``tt.scan`` with tuple operands).

* ``scan_fwd`` per chunk (delta = softplus(dt + bias) or dt + bias, 0 on the padded tail; a = 0 at a document start)
      a_t = exp(delta_t A) keep_t,  b_t = delta_t x_t B_t,  b_0 += a_0 h_in                  [T, N1, BE, N2]
      h_t = scan_t((a, b); (a1, b1), (a2, b2) -> (a1 a2, a2 b1 + b2))[1]       (h_t = a_t h_{t-1} + b_t)
      y_t = sum_n h_t C_t + D x_t;   y_t *= silu(z_t);   h_in <- h_{T-1}
  writes y, the final state and (``save=True``, under ``jax.vjp``) the state entering every backward chunk (T_save
  tokens, dividing T: rows of h inside a chunk), hs [L / T_save, E, N].
  With P > 1 parts, ``scan_part_fwd`` first gives each part's end state from zero, S_p, and decay product, D_p
  (exp(A sum_t delta_t) over the part, one exp per state), for every part but the last (nothing reads it); part p
  then starts from h_p = D_{p-1} h_{p-1} + S_{p-1} (h_0 the initial state), folded in the program.
* ``scan_bwd`` per chunk in reverse order: recompute a, b, h_t from hs[c] as above; then with g_t = C_t dy'_t
  (dy' = dy silu(z), and dz from the saved ungated y', both elementwise in the wrapper) the adjoint
  G_t = dL/dh_t = g_t + a_{t+1} G_{t+1} by a reverse scan (kind "adjoint", G_in = a_0' G_0' of the chunk after
  added to g_{T-1}), and
      dC_t = sum_e h_t dy';  dB_t = sum_e G_t delta x;  du = sum_n G_t B_t;  dx = du delta + D dy'
      s_t = G_t a_t h_{t-1} = G_t (h_t - b_t);  d delta = du x + sum_n s A;  dA += sum_t s delta
  dx, ddt per token; dB, dC as per-program partial sums [b, E/(K S BE), L, N] (a program walks S sub-blocks of BE
  channels inside each chunk, static, and K groups of them, a dynamic loop whose carries stay in memory between
  chunks, and adds their dB, dC; XLA sums the partials); dA, dD, d dt_bias per (row, channel block, part) summed in
  registers (K > 1: in their outputs); the carry after the first chunk of part 0 is the initial state's gradient.
  The sums over lanes (du, d delta over the state's lanes; dB, dC over the channels') reduce-scatter where the
  layout allows it (``_scatter_lanes``, ``lanes.reduce_scatter``): the chunk's T rows halve at each lane bit, one
  shuffle per pair, and each lane writes the sums of its own tokens; elsewhere Triton's butterfly sums.
  With P > 1 parts, ``scan_part_bwd`` first gives each part's a_s G_s at its first token s from a zero adjoint
  past its end, Q_p, and decay product D_p, for every part but the first; part p starts from Q_{p+1} + D_{p+1}
  (...) folded back from the final state's gradient.
  h_{t-1} never needs a shift (a_t h_{t-1} = h_t - b_t) and neither does a_{t+1} (the "adjoint" combine).
The last (first) row of a tile, a carry, is a masked sum over T (free: T is in a thread, the mask constant).
Decays, softplus and sigmoid are ``fastmath``'s (MUFU approximations, not libdevice) and the scan's combine fused
multiply-adds: the instruction count is the kernels' budget (docs/KERNELS.md, Selective scan).

Layouts (the wrapper pads and splits N): x, dt, z, dy [b, Lp, Ep] (input dtypes); B, C [b, Lp, N1, N2] f32;
A [N1, Ep, N2] f32; D, dt_bias [1, Ep] f32; keep [b, Lp] f32 (0 at a document start); saved states [b, nc, Ep, N1,
N2] f32 (channel-major); final state [b, N1, Ep, N2] and part summaries [b, P - 1, N1, Ep, N2] f32. Lp = P cpp T;
Ep a multiple of BE (backward: of S BE); N1, N2, BE, S, T powers of two. Every ``pallas_call`` names the Triton backend
(``CompilerParams``), so jax 0.10 and 0.11 lower alike.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltr

from pallas_kernels import fastmath
from pallas_kernels.fastmath import LOG2E, exp2, fma
from pallas_kernels.lanes import reduce_scatter, scatter_origin
from pallas_kernels.lowering import lower_once
from pallas_kernels.selective_scan.linear_scan import linear_scan

_F32 = jnp.float32


def _cparams(num_warps, num_stages):
    return pltr.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def _rows(c, T):
    """The ds of chunk c's T rows (c a traced loop index or a Python int)."""
    start = c * T
    return pl.ds(start if isinstance(start, int) else pl.multiple_of(start, T), T)


def _split_refs(refs, names):
    """refs in the order of `names` (absent entries skipped) -> dict name -> ref or None."""
    out, it = {}, iter(refs)
    for name, present in names:
        out[name] = next(it) if present else None
    return out


def _delta(dt, bias, dt_softplus, t, L):
    """(delta, d delta / d dt) of raw dt rows (any shape, bias broadcast): softplus(dt + bias) (identity above 20,
    Mamba's threshold) or dt + bias, computed once per (token, channel) (`_compact`); both 0 where the token index
    t >= L (t None: no padded tail)."""
    v = dt.astype(_F32) + bias
    if dt_softplus:
        big = v > 20.0
        d, dd = jnp.where(big, v, fastmath.softplus(v)), jnp.where(big, 1.0, fastmath.sigmoid(v))
    else:
        d, dd = v, jnp.ones_like(v)
    d, dd = _compact(d), _compact(dd)
    if t is not None:
        live = t < L
        d, dd = jnp.where(live, d, 0.0), jnp.where(live, dd, 0.0)
    return d, dd


class _Chunk:
    """Loads and the forward recurrence of one chunk of T tokens inside a program whose W = S BE channels are S
    sub-blocks of BE (walked one after the other inside a chunk; the forward has S = 1)."""

    def __init__(self, r, T, L, Lp, BE, S, dt_softplus, with_dy, with_x=True, with_b=True, with_c=True, col0=None):
        """col0: the first of these W channels among the program's (a traced group offset), None: all of them."""
        self.r, self.T, self.L, self.Lp, self.BE, self.S, self.sp = r, T, L, Lp, BE, S, dt_softplus
        self.col0 = col0
        self.bias = [r["bias"][:, self.cols(j)].astype(_F32) for j in range(S)]     # [1, BE]
        self.A = [r["a"][:, self.cols(j), :].astype(_F32) for j in range(S)]        # [N1, BE, N2]
        # exp(delta A) as exp2(delta A log2 e): ex2.approx, not libdevice's accurate expf
        self.A2 = [A * LOG2E for A in self.A]
        self.rows = (["x"] if with_x else []) + ["dt"] + (["dy"] if with_dy else []) + \
            (["z"] if r.get("z") is not None else [])
        self.bc = (["b"] if with_b else []) + (["c"] if with_c else [])

    def first(self, j):
        """Index of sub-block j's first channel among the program's."""
        return (0 if self.col0 is None else self.col0) + j * self.BE

    def cols(self, j):
        if self.col0 is not None:
            return pl.ds(pl.multiple_of(self.col0 + j * self.BE, self.BE), self.BE)
        return pl.ds(j * self.BE, self.BE) if self.S > 1 else slice(None)

    def load(self, c):
        """{"b", "c": [T, N1, N2], "keep": [T], "sub": [{"x", "dt", ...: [T, BE]} per sub-block]}"""
        sl = _rows(c, self.T)
        d = {n: self.r[n][sl, :, :] for n in self.bc}
        d["sub"] = [{n: self.r[n][sl, self.cols(j)] for n in self.rows} for j in range(self.S)]
        if self.r.get("keep") is not None:
            d["keep"] = self.r["keep"][sl]
        return d

    def delta(self, dt, c, j):
        """(delta [T, BE], d delta / d dt [T, BE]) of raw dt rows; both 0 on the padded tail t >= L."""
        t = c * self.T + lax.broadcasted_iota(jnp.int32, dt.shape, 0)
        return _delta(dt, self.bias[j], self.sp, t if self.L < self.Lp else None, self.L)

    def decays(self, rows, delta, j):
        """a = exp(delta A) keep [T, N1, BE, N2] (0 at a document start)."""
        a = exp2(_e(delta) * self.A2[j][None])
        if "keep" in rows:
            a = a * rows["keep"][:, None, None, None]
        return a

    def part_decay(self, dsum, kmin, j):
        """prod_t a_t over a part [N1, BE, N2] in closed form, exp(A sum_t delta_t) (0 if a document starts in it),
        from the running sums dsum [T, BE] of the chunks' delta rows and the running minimum kmin [T] of their keep
        rows (None: no segments): one exp per state and part instead of a product per token."""
        d = exp2(jnp.sum(dsum, axis=0)[None, :, None] * self.A2[j])
        if kmin is not None:
            d = d * jnp.min(kmin)
        return d

    def part_sums(self, rows, delta, dsum, kmin):
        """`part_decay`'s running sums updated with a chunk (elementwise: reduced once, after the loop)."""
        return dsum + delta, (None if kmin is None else jnp.minimum(kmin, rows["keep"]))

    def states(self, rows, xr, delta, h_in, j):
        """(a, u, b, h) of the chunk: decay [T, N1, BE, N2], u = delta x [T, BE], input b = u B and the state after
        every token, from xr (`_f32_rows` of x) and h_in [N1, BE, N2] (folded into the first token's input,
        a_0 h_in + b_0, so the scan's product of decays is dead code)."""
        a = self.decays(rows, delta, j)
        u = _compact(delta * xr)
        bx = _e(u) * _n(rows["b"])
        _, h = linear_scan(a, _at_row(bx, 0, fma(a, jnp.broadcast_to(h_in[None], a.shape), bx)))
        return a, u, bx, h


def _compact(v):
    """v [T, BE], computed once per (token, channel). A sum over a new axis of size 1 is the identity, but Triton's
    layout pass does not move a reduction's operand into the layout of its user: without it the pass recomputes the
    whole elementwise chain (softplus: three MUFU ops per element) in the broadcast layout of the [T, N1, BE, N2]
    tiles, where each value is repeated on the N2 lanes of its channel."""
    return jnp.sum(v[..., None], axis=-1)


def _f32_rows(v):
    """Raw [T, BE] rows (x, dy) in f32, converted once per (token, channel) (`_compact`)."""
    return _compact(v.astype(_F32))


def _e(v):
    """[T, BE] -> [T, 1, BE, 1] (per channel, broadcast over the state)."""
    return v[:, None, :, None]


def _n(v):
    """[T, N1, N2] rows of B or C -> f32 [T, N1, 1, N2] (per state, broadcast over the channels)."""
    return v.astype(_F32)[:, :, None, :]


def _fma_sum(u, v, axis, acc=None):
    """sum over `axis` of u v (+ acc), as a chain of fused multiply-adds over the rows of `axis`. The axis must lie
    inside a thread (T, N1): each row is a masked sum whose other rows are -0.0, a register pick that LLVM folds.
    Pallas' Triton backend never contracts a product and a sum (a reduction of u v costs a multiply and an add per
    element; here one FFMA)."""
    shape = jnp.broadcast_shapes(u.shape, v.shape)
    u, v = jnp.broadcast_to(u, shape), jnp.broadcast_to(v, shape)

    for i in range(shape[axis]):
        ui, vi = _row(u, i, axis), _row(v, i, axis)
        acc = ui * vi if acc is None else fma(ui, vi, acc)
    return acc


def _dot_n(u, v):
    """sum over the state of u v ([T, N1, BE, N2] operands, broadcastable) -> [T, BE]: a fused chain over the
    in-thread N1, then the lanes' N2."""
    return jnp.sum(_fma_sum(u, v, axis=1), axis=2)


def _row(v, i, axis=0):
    """Row i (static) of v along `axis` (T by default) as a masked sum (no value slicing in the Triton backend).
    The axis is inside a thread, so the mask is a constant per register, and the other rows are -0.0, which
    x + (-0.0) = x drops exactly: no instructions (with 0.0 each row would cost an add)."""
    t = lax.broadcasted_iota(jnp.int32, v.shape, axis)
    return jnp.sum(jnp.where(t == i, v, -0.0), axis=axis)


def _tile_row(v, T):
    """v [N1, BE, N2] as row 0 of its broadcast over T: the same values, in the layout of a row of the chunk's
    [T, N1, BE, N2] tiles. A chunk loop's carry initialised straight from a load keeps the load's (coalesced)
    layout, and Triton then converts the row each chunk yields through shared memory, every chunk."""
    return _row(jnp.broadcast_to(v[None], (T,) + v.shape), 0)


def _at_row(v, i, w):
    """v [T, ...] with row i (static) taken from w (same shape): only that row of w is computed."""
    t = lax.broadcasted_iota(jnp.int32, v.shape, 0)
    return jnp.where(t == i, w, v)


def _chunk_loop(n, order, body, init, load, prefetch, c0=0):
    """fori_loop over the n chunks c0 .. c0 + n - 1 in `order` ("fwd" | "rev"): body(c, carry, rows) -> carry.
    With prefetch the rows of the next chunk are loaded before the current one is computed and carried (a double
    buffer)."""
    chunk_of = (lambda j: c0 + j) if order == "fwd" else (lambda j: c0 + n - 1 - j)
    if not prefetch:
        return lax.fori_loop(0, n, lambda j, carry: body(chunk_of(j), carry, load(chunk_of(j))), init)

    def step(j, carry):
        inner, rows = carry
        nxt = load(chunk_of(jnp.minimum(j + 1, n - 1)))
        return body(chunk_of(j), inner, rows), nxt

    return lax.fori_loop(0, n, step, (init, load(chunk_of(0))))[0]


_UNROLL_PARTS = 8   # parts folded per unrolled group


def _carry_in(P, p, init, step, order):
    """The state (forward) or adjoint (backward) entering part p from the part summaries: folds step(s, v) over
    the parts before p ("fwd": q = 0 .. p - 1) or after it ("rev": q = P - 1 .. p + 1), starting from init. The
    part that no program reads back (the last forward, the first backward) has no summary: the forward's part q
    sits in slot s = q, the backward's in s = q - 1 (P - 1 slots)."""
    if P == 1:
        return init

    def body(i, v):
        q = i if order == "fwd" else P - 1 - i
        use = (q < p) if order == "fwd" else (q > p)
        # a group may run past the last candidate: its (unused) slot is clamped in bounds (forward: below P - 1;
        # backward: at or above 0)
        if order == "fwd":
            s = min(q, P - 2) if isinstance(q, int) else jnp.minimum(q, P - 2)
        else:
            s = max(q - 1, 0) if isinstance(q, int) else jnp.maximum(q - 1, 0)
        return jnp.where(use, step(s, v), v)

    n, U = P - 1, _UNROLL_PARTS

    def group(g, v):   # U parts unrolled: their summaries' loads issue together, not one latency per part
        for i in range(U):
            v = body(g * U + i, v)
        return v

    if n <= U:
        for i in range(n):
            init = body(i, init)
        return init
    # only the groups holding a part before (after) p: a dynamic trip count, half the summaries' loads on average
    todo = p if order == "fwd" else P - 1 - p
    return lax.fori_loop(0, (todo + U - 1) // U, group, init)


def _grid_specs(Lp, N1, N2, BE):
    """BlockSpecs of a (batch row, channel block, part) grid: whole sequences per program (the part picks its
    chunks inside)."""
    seq = pl.BlockSpec((None, Lp, BE), lambda ib, ie, ip: (ib, 0, ie))
    bc = pl.BlockSpec((None, Lp, N1, N2), lambda ib, ie, ip: (ib, 0, 0, 0))
    row = pl.BlockSpec((1, BE), lambda ib, ie, ip: (0, ie))
    state = pl.BlockSpec((None, N1, BE, N2), lambda ib, ie, ip: (ib, 0, ie, 0))
    amat = pl.BlockSpec((N1, BE, N2), lambda ib, ie, ip: (0, ie, 0))
    keep = pl.BlockSpec((None, Lp), lambda ib, ie, ip: (ib, 0))
    return seq, bc, row, state, amat, keep


def _parts_spec(P, N1, BE, N2):
    """The P - 1 part summaries of a channel block (`_parts_call`), [P - 1, N1, BE, N2] of [b, P - 1, N1, Ep, N2]."""
    return pl.BlockSpec((None, P - 1, N1, BE, N2), lambda ib, ie, ip: (ib, 0, 0, ie, 0))


def _part_spec(N1, BE, N2):
    """This program's part summary (or per-part output), [N1, BE, N2] of [b, P, N1, Ep, N2]."""
    return pl.BlockSpec((None, None, N1, BE, N2), lambda ib, ie, ip: (ib, ip, 0, ie, 0))


def _call(kern, name, grid, in_specs, args, out_specs, out_shape, num_warps, num_stages, interpret):
    return pl.pallas_call(kern, out_shape=out_shape, grid=grid, in_specs=in_specs, out_specs=out_specs,
                          compiler_params=_cparams(num_warps, num_stages), interpret=interpret, name=name)(*args)


# ------------------------------------------------------------------------------------------------------------
# forward
# ------------------------------------------------------------------------------------------------------------
def _fwd_part_kernel(*refs, T, cpp, L, Lp, dt_softplus, has_seg, prefetch, first):
    """Part summary: the state at the end of part p from a zero state, and the product of its decays (program i
    of the grid's part axis: part p = i + first)."""
    r = _split_refs(refs, [("x", 1), ("dt", 1), ("b", 1), ("a", 1), ("bias", 1), ("keep", has_seg),
                           ("sloc", 1), ("dprod", 1), ("z", 0)])
    ch = _Chunk(r, T, L, Lp, r["x"].shape[1], 1, dt_softplus, with_dy=False, with_c=False)

    def body(c, carry, rows):
        h_in, dsum, kmin = carry
        sub = rows["sub"][0]
        delta, _ = ch.delta(sub["dt"], c, 0)
        h = ch.states(rows, _f32_rows(sub["x"]), delta, h_in, 0)[-1]
        return (_row(h, T - 1), *ch.part_sums(rows, delta, dsum, kmin))

    zero = jnp.zeros(ch.A[0].shape, _F32)
    init = (zero, jnp.zeros((T, r["x"].shape[1]), _F32), jnp.ones((T,), _F32) if has_seg else None)
    h, dsum, kmin = _chunk_loop(cpp, "fwd", body, init, ch.load, prefetch, c0=(pl.program_id(2) + first) * cpp)
    r["sloc"][...] = h
    r["dprod"][...] = ch.part_decay(dsum, kmin, 0)


def _parts_call(kernel, name, seq_args, kinds, keep, first, *, T, L, BE, cpp, dt_softplus, interpret, prefetch,
                num_warps, num_stages):
    """Launches a part-summary kernel over (row, channel block, part): `seq_args` in the order of `kinds` ("seq"
    [b, Lp, Ep], "bc" [b, Lp, N1, N2], "a" [N1, Ep, N2], "row" [1, Ep]), then keep; two f32 outputs
    [b, P - 1, N1, Ep, N2], the summaries of parts first .. first + P - 2 (the forward's last part and the backward's
    first are read by no program: `_carry_in`)."""
    b, Lp = keep.shape if keep is not None else seq_args[kinds.index("seq")].shape[:2]
    Ep = seq_args[kinds.index("seq")].shape[2]
    N1, N2 = seq_args[kinds.index("bc")].shape[2:]
    seq, bc, row, _, amat, keep_spec = _grid_specs(Lp, N1, N2, BE)
    specs = dict(seq=seq, bc=bc, a=amat, row=row)
    in_specs, args = [specs[k] for k in kinds], list(seq_args)
    if keep is not None:
        in_specs.append(keep_spec)
        args.append(keep)
    P = Lp // (T * cpp)
    part = jax.ShapeDtypeStruct((b, P - 1, N1, Ep, N2), _F32)   # parts first .. first + P - 2
    kern = functools.partial(kernel, T=T, cpp=cpp, L=L, Lp=Lp, dt_softplus=dt_softplus, has_seg=keep is not None,
                             prefetch=prefetch, first=first)
    return _call(kern, name, (b, Ep // BE, P - 1), in_specs, args, [_part_spec(N1, BE, N2)] * 2, [part, part],
                 num_warps, num_stages, interpret)


@lower_once
def scan_part_fwd(x, dt, B, A, bias, keep, *, prefetch=True, num_warps=4, num_stages=2, **cfg):
    """Per part of cpp chunks but the last (cfg: T, L, BE, cpp, dt_softplus, interpret): (end state from zero
    [b, P - 1, N1, Ep, N2] f32, product of the part's decays, same)."""
    return _parts_call(_fwd_part_kernel, "selective_scan_fwd_parts", (x, dt, B, A, bias),
                       ("seq", "seq", "bc", "a", "row"), keep, 0, prefetch=prefetch, num_warps=num_warps,
                       num_stages=num_stages, **cfg)


def _fwd_kernel(*refs, T, cpp, P, L, dt_softplus, has_z, has_seg, save, T_save, prefetch):
    r = _split_refs(refs, [("x", 1), ("dt", 1), ("b", 1), ("c", 1), ("a", 1), ("d", 1), ("bias", 1), ("h0", 1),
                           ("z", has_z), ("keep", has_seg), ("sloc", P > 1), ("dprod", P > 1),
                           ("y", 1), ("fin", 1), ("hs", save), ("yp", save and has_z)])
    ch = _Chunk(r, T, L, P * cpp * T, r["x"].shape[1], 1, dt_softplus, with_dy=False)
    Dv = r["d"][...].astype(_F32)                                                   # [1, BE]
    p = pl.program_id(2)

    k = T // T_save   # saved states per chunk: h_in, then the state after tokens T_save - 1, 2 T_save - 1, ...

    def body(c, h_in, rows):
        if save:
            r["hs"][c * k, :, :, :] = jnp.transpose(h_in, (1, 0, 2))             # [BE, N1, N2]
        sub = rows["sub"][0]
        delta, _ = ch.delta(sub["dt"], c, 0)
        xr = _f32_rows(sub["x"])
        h = ch.states(rows, xr, delta, h_in, 0)[-1]
        if save:
            for i in range(1, k):
                r["hs"][c * k + i, :, :, :] = jnp.transpose(_row(h, i * T_save - 1), (1, 0, 2))
        y = _dot_n(h, _n(rows["c"])) + Dv * xr                                       # [T, BE]
        if has_z:
            if save:
                r["yp"][_rows(c, T), :] = y.astype(r["yp"].dtype)
            zr = sub["z"].astype(_F32)
            y = y * (zr * fastmath.sigmoid(zr))
        r["y"][_rows(c, T), :] = y.astype(r["y"].dtype)
        return _row(h, T - 1)

    h_in = _carry_in(P, p, r["h0"][...].astype(_F32),
                     lambda s, v: fma(r["dprod"][s, :, :, :], v, r["sloc"][s, :, :, :]), "fwd")
    fin = _chunk_loop(cpp, "fwd", body, _tile_row(h_in, T), ch.load, prefetch, c0=p * cpp)
    if P == 1:
        r["fin"][...] = fin
    else:
        @pl.when(p == P - 1)
        def _():
            r["fin"][...] = fin


@lower_once
def scan_fwd(x, dt, B, C, A, D, bias, h0, z, keep, sloc, dprod, *, T, L, BE, cpp, dt_softplus, save, interpret,
             T_save=None, prefetch=True, num_warps=4, num_stages=2):
    """Returns y [b, Lp, Ep] (x.dtype), final state [b, N1, Ep, N2] f32 and, if save, hs [b, Lp / T_save, Ep, N1,
    N2] f32, the state entering every T_save tokens (T_save divides T, default T; the backward's chunk), channel-major
    (a free reshape of [b, Lp / T_save, Ep, N], so the backward may split N its own way)
    and (with z) the ungated output y' = sum_n h C + D x [b, Lp, Ep] (x.dtype), for the gate's gradient.
    Lp = P cpp T: part p (a grid axis) starts from the state folded from `scan_part_fwd`'s summaries sloc, dprod
    (None when P = 1)."""
    b, Lp, Ep = x.shape
    N1, N2 = B.shape[2:]
    nc, nE = Lp // T, Ep // BE
    P = nc // cpp
    has_z, has_seg = z is not None, keep is not None
    seq, bc, row, state, amat, keep_spec = _grid_specs(Lp, N1, N2, BE)
    in_specs = [seq, seq, bc, bc, amat, row, row, state]
    args = [x, dt, B, C, A, D, bias, h0]
    if has_z:
        in_specs.append(seq)
        args.append(z)
    if has_seg:
        in_specs.append(keep_spec)
        args.append(keep)
    if P > 1:
        in_specs += [_parts_spec(P, N1, BE, N2)] * 2
        args += [sloc, dprod]
    out_shape = [jax.ShapeDtypeStruct((b, Lp, Ep), x.dtype), jax.ShapeDtypeStruct((b, N1, Ep, N2), _F32)]
    out_specs = [seq, state]
    T_save = T_save or T
    if T % T_save:
        raise ValueError(f"the saved states' interval {T_save} must divide the forward's chunk {T}")
    if save:
        ns = Lp // T_save
        out_shape.append(jax.ShapeDtypeStruct((b, ns, Ep, N1, N2), _F32))
        out_specs.append(pl.BlockSpec((None, ns, BE, N1, N2), lambda ib, ie, ip: (ib, 0, ie, 0, 0)))
    if save and has_z:
        out_shape.append(jax.ShapeDtypeStruct((b, Lp, Ep), x.dtype))
        out_specs.append(seq)
    kern = functools.partial(_fwd_kernel, T=T, cpp=cpp, P=P, L=L, dt_softplus=dt_softplus, has_z=has_z,
                             has_seg=has_seg, save=save, T_save=T_save, prefetch=prefetch)
    return _call(kern, "selective_scan_fwd", (b, nE, P), in_specs, args, out_specs, out_shape, num_warps,
                 num_stages, interpret)


# ------------------------------------------------------------------------------------------------------------
# backward
# ------------------------------------------------------------------------------------------------------------
def _adjoint(a, g, G_in):
    """G_t = g_t + a_{t+1} G_{t+1} inside a chunk, G past its end = G_in (the a_0' G_0' of the chunk after, added
    to the last token's g, so the scan's product of decays is dead code)."""
    T = a.shape[0]
    g = _at_row(g, T - 1, g + jnp.broadcast_to(G_in[None], g.shape))
    return linear_scan(a, jnp.ones_like(a), g, kind="adjoint", reverse=True)[2]


def _bwd_part_kernel(*refs, T, cpp, L, Lp, dt_softplus, has_seg, prefetch, first):
    """Part summary of the adjoint: a_s G_s at the part's first token s from a zero adjoint past its end, and the
    product of the part's decays."""
    r = _split_refs(refs, [("dt", 1), ("c", 1), ("a", 1), ("bias", 1), ("dy", 1), ("keep", has_seg),
                           ("qloc", 1), ("dprod", 1), ("z", 0), ("x", 0)])
    ch = _Chunk(r, T, L, Lp, r["dt"].shape[1], 1, dt_softplus, with_dy=True, with_x=False, with_b=False)

    def body(c, carry, rows):
        Q, dsum, kmin = carry
        sub = rows["sub"][0]
        delta, _ = ch.delta(sub["dt"], c, 0)
        a = ch.decays(rows, delta, 0)
        G = _adjoint(a, _n(rows["c"]) * _e(_f32_rows(sub["dy"])), Q)
        return (_row(a * G, 0), *ch.part_sums(rows, delta, dsum, kmin))

    zero = jnp.zeros(ch.A[0].shape, _F32)
    init = (zero, jnp.zeros((T, r["dt"].shape[1]), _F32), jnp.ones((T,), _F32) if has_seg else None)
    q, dsum, kmin = _chunk_loop(cpp, "rev", body, init, ch.load, prefetch, c0=(pl.program_id(2) + first) * cpp)
    r["qloc"][...] = q
    r["dprod"][...] = ch.part_decay(dsum, kmin, 0)


@lower_once
def scan_part_bwd(dt, C, A, bias, dy, keep, *, prefetch=True, num_warps=4, num_stages=2, **cfg):
    """Per part of cpp chunks but the first (cfg: T, L, BE, cpp, dt_softplus, interpret): (a_s G_s at its first
    token s from a zero adjoint past its end, product of the part's decays), [b, P - 1, N1, Ep, N2] f32 each (dy:
    the gradient of the ungated output)."""
    return _parts_call(_bwd_part_kernel, "selective_scan_bwd_parts", (dt, C, A, bias, dy),
                       ("seq", "bc", "a", "row", "seq"), keep, 1, prefetch=prefetch, num_warps=num_warps,
                       num_stages=num_stages, **cfg)


def _scatter_lanes(BE, N2, num_warps):
    """(el, er): channels on lanes and inside a thread when the backward's sums may scatter over the lanes
    (`lanes.reduce_scatter`): one warp whose 32 lanes hold distinct (channel, state) pairs in Triton's default layout
    of a [T, N1, BE, N2] tile (lane = n2 + N2 (e mod el), e // el in registers). None otherwise (Triton's sums)."""
    if num_warps != 1 or N2 > 32 or BE * N2 < 32:
        return None
    el = 32 // N2
    return el, BE // el


def _bwd_kernel(*refs, T, BE, S, K, cpp, P, L, dt_softplus, has_seg, prefetch, lanes):
    r = _split_refs(refs, [("x", 1), ("dt", 1), ("b", 1), ("c", 1), ("a", 1), ("d", 1), ("bias", 1),
                           ("hs", 1), ("dy", 1), ("dfin", 1), ("z", 0), ("keep", has_seg),
                           ("qloc", P > 1), ("dprod", P > 1),
                           ("dx", 1), ("ddt", 1), ("db", 1), ("dc", 1), ("dA", 1), ("dD", 1), ("dbias", 1),
                           ("dh0", 1), ("gk", K > 1)])
    Lp, W = P * cpp * T, S * BE
    N1, N2 = r["b"].shape[1:]
    p = pl.program_id(2)
    if lanes is not None:
        el, er = lanes
        n2_of = lax.broadcasted_iota(jnp.int32, (BE, N2), 1)                       # a [BE, N2] tile's lanes
        e_of = lax.broadcasted_iota(jnp.int32, (BE, N2), 0)
        origin = scatter_origin((N1, el, N2), 1, T)                                 # where `scatter_bc` puts rows

    def skips(ch):
        """Per sub-block of `ch`, D [1, BE] and (with `lanes`) D on the lanes of state 0 [BE, N2], where D dy' enters
        dx once per channel, before the sum over the state's lanes."""
        out = []
        for j in range(S):
            Dv = r["d"][:, ch.cols(j)].astype(_F32)
            out.append((Dv, None if lanes is None else jnp.where(n2_of == 0, Dv[0][:, None], 0.0)))
        return out

    def state_sums(ch, Dv, Dz, c, j, G, s, delta, ddelta_ddt, xr, dyp, rows, db_acc):
        """dx = du delta + D dy' and ddt = (du x + sum_n s A) d delta/d dt, du = sum_n G B: written; returns the
        updated d dt_bias accumulator. With `lanes`, both sums scatter over the state's lanes (linear in the lanes'
        partial sums, so the per-token factors apply before the sum): 2 T values, each lane writing 2 T / N2."""
        sl, cols = _rows(c, T), ch.cols(j)
        if lanes is None:
            du = _dot_n(G, _n(rows["b"]))                                           # [T, BE]
            ddt = (du * xr + _dot_n(s, ch.A[j][None])) * ddelta_ddt
            r["dx"][sl, cols] = (du * delta + Dv * dyp).astype(r["dx"].dtype)
            r["ddt"][sl, cols] = ddt.astype(r["ddt"].dtype)
            return db_acc + ddt
        U = _fma_sum(G, _n(rows["b"]), axis=1)                                      # [T, BE, N2]: lanes' parts
        V = _fma_sum(s, ch.A[j][None], axis=1)
        # [T, BE] rows in U's layout: from their broadcast over the state (already live), not a new broadcast
        # (Triton would recompute softplus etc. in that layout)
        lane = lambda v: _row(jnp.broadcast_to(_e(v), G.shape), 0, axis=1)        # noqa: E731
        P1 = fma(lane(delta), U, lane(dyp) * Dz[None])
        P2 = lane(ddelta_ddt) * fma(lane(xr), U, V)
        # each sum scatters alone, so both land on the same lanes: a lane writes dx and ddt of the same T / N2 tokens
        dx_sums, at = reduce_scatter([_row(P1, t) for t in range(T)], axis=1, lane_stride=1)
        ddt_sums, _ = reduce_scatter([_row(P2, t) for t in range(T)], axis=1, lane_stride=1)
        col = ch.first(j) + e_of
        for k, (vx, vt) in enumerate(zip(dx_sums, ddt_sums)):                       # [BE, N2] each
            row = c * T + at(k)
            r["dx"][row, col] = vx.astype(r["dx"].dtype)
            r["ddt"][row, col] = vt.astype(r["ddt"].dtype)
            db_acc = db_acc + vt
        return db_acc

    def channel_sum(v, w):
        """sum over the channels of v [T, N1, BE, N2] times the rows w [T, BE]: all of it (Triton), or, with
        `lanes`, only the er channels of each thread, a chain of fused multiply-adds -> [T, N1, el, N2] (the lanes'
        share is `scatter_bc`'s)."""
        if lanes is None:
            return jnp.sum(v * _e(w), axis=2)
        split = (T, N1, er, el, N2)   # w broadcast in v's layout first (a reshape of the rows needs shared memory)
        return _fma_sum(v.reshape(split), jnp.broadcast_to(_e(w), v.shape).reshape(split), axis=2)

    def scatter_bc(dB, dC):
        """A sub-block's dB, dC ([T, N1, el, N2] each, `channel_sum`) summed over the lanes' channels, scattered
        over the lanes (`lanes.reduce_scatter`, the chunk's T rows the items; `origin` says which): T / el tiles
        [N1, el, N2] each, added up over the sub-blocks (and groups) before `write_bc` (fewer live registers than
        adding the [T, N1, el, N2] tiles)."""
        sb, _ = reduce_scatter([_row(dB, t) for t in range(T)], axis=1, lane_stride=N2)
        sc, _ = reduce_scatter([_row(dC, t) for t in range(T)], axis=1, lane_stride=N2)
        return sb, sc

    def write_bc(c, dB, dC):
        """Stores the chunk's dB, dC partial sums: [T, N1, N2] tiles, or (`lanes`) `scatter_bc`'s lists."""
        sl = _rows(c, T)
        if lanes is None:
            r["db"][sl, :, :] = dB
            r["dc"][sl, :, :] = dC
            return
        n1 = lax.broadcasted_iota(jnp.int32, (N1, el, N2), 0)
        n2 = lax.broadcasted_iota(jnp.int32, (N1, el, N2), 2)
        for k, (vb, vc) in enumerate(zip(dB, dC)):                                   # [N1, el, N2] each
            row = c * T + origin(k)
            r["db"][row, n1, n2] = vb
            r["dc"][row, n1, n2] = vc

    def sub_block(ch, D, c, j, rows, G_in, dA_acc, dD_acc, db_acc):
        """Chunk c of sub-block j: writes dx, ddt; returns its dB, dC (`channel_sum`) and the updated carries
        (dA_acc None: the chunk's dA alone)."""
        cols, sub = ch.cols(j), rows["sub"][j]
        delta, ddelta_ddt = ch.delta(sub["dt"], c, j)
        xr = _f32_rows(sub["x"])
        dyp = _f32_rows(sub["dy"])     # dy' = dy silu(z) (the wrapper applies the gate)
        a, u, bx, h = ch.states(rows, xr, delta, jnp.transpose(r["hs"][c, cols, :, :], (1, 0, 2)), j)
        # everything that needs h first, so that only a and a h_{t-1} = h - b stay live through the adjoint scan
        dC = channel_sum(h, dyp)
        ah = h - bx                                                                 # a_t h_{t-1}
        G = _adjoint(a, _n(rows["c"]) * _e(dyp), G_in)                             # dL/dh_t
        dB = channel_sum(G, u)
        s = G * ah
        dA_acc = _fma_sum(s, _e(delta), 0, dA_acc)
        db_acc = state_sums(ch, *D[j], c, j, G, s, delta, ddelta_ddt, xr, dyp, rows, db_acc)
        dD_acc = dD_acc + dyp * xr            # [T, BE]: summed over T once, after the loop (or the group's chunk)
        return dB, dC, (_row(a * G, 0), dA_acc, dD_acc, db_acc)

    def group(ch, D, c, rows, carry):
        """Chunk c of `ch`'s S sub-blocks (static: they share the chunk's B, C rows and its dB, dC sums): writes dx,
        ddt; returns (dB, dC summed over the sub-blocks, the sub-blocks' new carries). D: `skips(ch)`."""
        bc, new = None, []
        for j in range(S):
            dBj, dCj, cj = sub_block(ch, D, c, j, rows, *carry[j])
            part = (dBj, dCj) if lanes is None else scatter_bc(dBj, dCj)
            bc = part if bc is None else jax.tree.map(jnp.add, bc, part)
            new.append(cj)
        return bc, tuple(new)

    def g_in(ch, j):
        cols = ch.cols(j)
        return _carry_in(P, p, r["dfin"][:, cols, :].astype(_F32),
                         lambda s, v: fma(r["dprod"][s, :, cols, :], v, r["qloc"][s, :, cols, :]), "rev")

    def dbias_of(db_acc):
        """d dt_bias [1, BE] from its accumulator. With `lanes` the sums sit on the state's lanes; with fewer tokens
        than state lanes (T < N2) each on N2 / T of them."""
        if lanes is None:
            return jnp.sum(db_acc, axis=0, keepdims=True)
        return (jnp.sum(db_acc, axis=1) * (min(T, N2) / N2))[None]

    def when_first_part(fn):
        if P == 1:
            fn()
        else:
            pl.when(p == 0)(fn)

    zrow = jnp.zeros((T, BE), _F32)
    zdb = zrow if lanes is None else jnp.zeros((BE, N2), _F32)
    zA = jnp.zeros((N1, BE, N2), _F32)
    if K == 1:   # the sub-blocks' carries in registers from chunk to chunk
        ch = _Chunk(r, T, L, Lp, BE, S, dt_softplus, with_dy=True)
        D = skips(ch)

        def body(c, carry, rows):
            bc, new = group(ch, D, c, rows, carry)
            write_bc(c, *bc)
            return new

        init = tuple((_tile_row(g_in(ch, j), T), zA, zrow, zdb) for j in range(S))
        out = _chunk_loop(cpp, "rev", body, init, ch.load, prefetch, c0=p * cpp)
        for j in range(S):
            G, dA_acc, dD_acc, db_acc = out[j]
            cols = ch.cols(j)
            r["dA"][:, cols, :] = dA_acc
            r["dD"][:, cols] = jnp.sum(dD_acc, axis=0, keepdims=True)
            r["dbias"][:, cols] = dbias_of(db_acc)

            def _(cols=cols, G=G):
                r["dh0"][:, cols, :] = G
            when_first_part(_)
        return

    # K groups of S sub-blocks, walked in a dynamic loop inside each chunk: a group's carries live in memory between
    # chunks (the adjoint in `gk`, dA, dD and d dt_bias in their own outputs, read, updated and written back, each
    # by the thread that wrote it: the same tile shapes and refs, so the same layout), the chunk's dB, dC summed
    # over the groups in registers and written once
    group_ch = lambda g: _Chunk(r, T, L, Lp, BE, S, dt_softplus, with_dy=True, col0=g * W)   # noqa: E731

    def init_group(g, _):
        ch = group_ch(g)
        for j in range(S):
            cols = ch.cols(j)
            r["gk"][:, cols, :] = g_in(ch, j)
            r["dA"][:, cols, :] = zA
            r["dD"][:, cols] = jnp.zeros((1, BE), _F32)
            r["dbias"][:, cols] = jnp.zeros((1, BE), _F32)
        return _

    def chunk_groups(c, _, rows):
        del rows   # each group loads its own rows

        def one(g, bc):
            ch = group_ch(g)
            # the chunk's dA sums alone, added to the loaded total once (a chain of FMAs onto a loaded tile would run
            # in the load's layout, each row converted through shared memory)
            carry = tuple((r["gk"][:, ch.cols(j), :], None, zrow, zdb) for j in range(S))
            part, new = group(ch, skips(ch), c, ch.load(c), carry)
            for j, (G, dA_c, dD_acc, db_acc) in enumerate(new):
                cols = ch.cols(j)
                r["gk"][:, cols, :] = G
                r["dA"][:, cols, :] = r["dA"][:, cols, :] + dA_c
                r["dD"][:, cols] = r["dD"][:, cols] + jnp.sum(dD_acc, axis=0, keepdims=True)
                r["dbias"][:, cols] = r["dbias"][:, cols] + dbias_of(db_acc)
            return jax.tree.map(jnp.add, bc, part)

        if lanes is None:
            zero = (jnp.zeros((T, N1, N2), _F32),) * 2
        else:
            zero = tuple([jnp.zeros((N1, el, N2), _F32)] * max(1, T // el) for _ in range(2))
        write_bc(c, *lax.fori_loop(0, K, one, zero))
        return _

    lax.fori_loop(0, K, init_group, 0)
    _chunk_loop(cpp, "rev", chunk_groups, 0, lambda c: None, False, c0=p * cpp)

    def copy_dh0():
        def one(g, _):
            ch = group_ch(g)
            for j in range(S):
                r["dh0"][:, ch.cols(j), :] = r["gk"][:, ch.cols(j), :]
            return _
        lax.fori_loop(0, K, one, 0)
    when_first_part(copy_dh0)


@lower_once
def scan_bwd(x, dt, B, C, A, D, bias, hs, dy, dfin, keep, qloc, dprod, *, T, L, BE, cpp, dt_softplus, interpret,
             sub_blocks=1, groups=1, prefetch=True, scatter=True, num_warps=4, num_stages=2):
    """dy: the gradient of the ungated output, dy' = dy silu(z) (the wrapper differentiates the gate).
    Returns dx (x.dtype), ddt (dt.dtype) [b, Lp, Ep]; dB, dC partial sums per program
    [b, Ep/(K S BE), Lp, N1, N2] f32; dA [b, P, N1, Ep, N2], dD, d dt_bias [b, P, 1, Ep] (per batch row and part),
    d h0 [b, N1, Ep, N2] f32. Each program owns K = groups groups (a dynamic loop, carries in memory between chunks)
    of S = sub_blocks blocks of BE channels (Ep a multiple of K S BE) and one part of cpp chunks, whose adjoint past
    its end folds `scan_part_bwd`'s summaries qloc, dprod (None when P = 1). prefetch applies when K = 1."""
    b, Lp, Ep = x.shape
    N1, N2 = B.shape[2:]
    W = groups * sub_blocks * BE
    nc, nE = Lp // T, Ep // W
    P = nc // cpp
    has_seg = keep is not None
    seq, bc, row, state, amat, keep_spec = _grid_specs(Lp, N1, N2, W)
    in_specs = [seq, seq, bc, bc, amat, row, row,
                pl.BlockSpec((None, nc, W, N1, N2), lambda ib, ie, ip: (ib, 0, ie, 0, 0)), seq, state]
    args = [x, dt, B, C, A, D, bias, hs, dy, dfin]
    if has_seg:
        in_specs.append(keep_spec)
        args.append(keep)
    if P > 1:
        in_specs += [_parts_spec(P, N1, W, N2)] * 2
        args += [qloc, dprod]
    part = pl.BlockSpec((None, None, Lp, N1, N2), lambda ib, ie, ip: (ib, ie, 0, 0, 0))
    brow = pl.BlockSpec((None, None, 1, W), lambda ib, ie, ip: (ib, ip, 0, ie))
    st = jax.ShapeDtypeStruct((b, N1, Ep, N2), _F32)
    per_part = jax.ShapeDtypeStruct((b, P, N1, Ep, N2), _F32)
    out_shape = [jax.ShapeDtypeStruct((b, Lp, Ep), x.dtype), jax.ShapeDtypeStruct((b, Lp, Ep), dt.dtype),
                 jax.ShapeDtypeStruct((b, nE, Lp, N1, N2), _F32), jax.ShapeDtypeStruct((b, nE, Lp, N1, N2), _F32),
                 per_part, jax.ShapeDtypeStruct((b, P, 1, Ep), _F32), jax.ShapeDtypeStruct((b, P, 1, Ep), _F32), st]
    out_specs = [seq, seq, part, part, _part_spec(N1, W, N2), brow, brow, state]
    if groups > 1:   # the groups' adjoints between chunks (scratch)
        out_shape.append(per_part)
        out_specs.append(_part_spec(N1, W, N2))
    lanes = _scatter_lanes(BE, N2, num_warps) if scatter else None
    kern = functools.partial(_bwd_kernel, T=T, BE=BE, S=sub_blocks, K=groups, cpp=cpp, P=P, L=L,
                             dt_softplus=dt_softplus, has_seg=has_seg, prefetch=prefetch, lanes=lanes)
    return tuple(_call(kern, "selective_scan_bwd", (b, nE, P), in_specs, args, out_specs, out_shape, num_warps,
                       num_stages, interpret))[:8]
