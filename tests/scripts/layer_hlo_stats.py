"""HLO statistics of one Doge-160M decoder layer, forward + backward, compiled for the local backend (CPU).

    python tests/scripts/layer_hlo_stats.py [B S [TAG [N]]]     (docs/benchmarks-history.md, "Elementwise changes")

bf16 compute (CDT=f32 in the environment: f32), f32 params, b=B s=S; attention is an opaque custom call
(`jax.pure_callback`) that takes q, k, v, bias and saves the Pallas kernel's residuals (o, lse), so only the code
around the kernel is compiled. Prints the top-level op kinds, the number of concatenates, the bytes of every
[b, s, ...]-shaped operand and result of the top-level ops ("activation bytes") and the N largest ops; writes the
optimized HLO to $HLO_DIR/hlo_TAG.txt when HLO_DIR is set. Compile only; nothing is run.
"""
import collections, os, re, sys
import numpy as np
import jax, jax.numpy as jnp
import flax.linen as nn
import wmjax.layers.attention as attn_mod
from wmjax.config import DogeConfig
from wmjax.models.doge import DogeDecoderLayer
from wmjax.layers.rope import rope_cos_sin

B, S = int(sys.argv[1]) if len(sys.argv) > 1 else 2, int(sys.argv[2]) if len(sys.argv) > 2 else 256

def _host(*shapes):
    def f(*args):
        return tuple(np.zeros(s.shape, s.dtype) for s in shapes)
    return f

@jax.custom_vjp
def stub_attn(q, k, v, bias):
    return stub_fwd(q, k, v, bias)[0]

def stub_fwd(q, k, v, bias):
    b, s, h, d = q.shape
    o, lse = jax.pure_callback(_host(jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, h, s), jnp.float32)),
                               (jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, h, s), jnp.float32)),
                               q, k, v, bias)
    return o, (q, k, v, bias, o, lse)

def stub_bwd(res, do):
    shapes = tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in res[:4])
    return tuple(jax.pure_callback(_host(*shapes), shapes, *res, do))

stub_attn.defvjp(stub_fwd, stub_bwd)

def fake_dma(q, k, v, bias, **kw):
    return stub_attn(q, k, v, bias)

attn_mod.dynamic_mask_attention = fake_dma

cfg = DogeConfig(vocab_size=32768, hidden_size=768, intermediate_size=1536, num_hidden_layers=1,
                 num_attention_heads=6, num_key_value_heads=3, head_dim=128, keep_window_size=2048,
                 tie_word_embeddings=True)
CDT = jnp.float32 if os.environ.get("CDT") == "f32" else jnp.bfloat16
layer = DogeDecoderLayer(cfg, dtype=CDT, param_dtype=jnp.float32)
h0 = jnp.zeros((B, S, 768), CDT)
pos = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
mask = jnp.ones((B, S), bool)
cos, sin = rope_cos_sin(pos, 128, cfg.rope_theta, dtype=CDT)
params = nn.meta.unbox(layer.init(jax.random.PRNGKey(0), h0, cos, sin, pos, mask))["params"]

def fwd_bwd(params, h, cos, sin, ct):
    def f(params, h):
        out = layer.apply({"params": params}, h, cos, sin, pos, mask)[0]
        return jnp.sum(out.astype(jnp.float32) * ct)
    return jax.grad(f, argnums=(0, 1))(params, h)

ct = jnp.ones((B, S, 768), jnp.float32)
lowered = jax.jit(fwd_bwd).lower(params, h0, cos, sin, ct)
txt = lowered.compile().as_text()
if os.environ.get("HLO_DIR"):
    open(os.path.join(os.environ["HLO_DIR"], f"hlo_{sys.argv[3] if len(sys.argv) > 3 else 'cur'}.txt"), "w").write(txt)

DT = {"bf16": 2, "f32": 4, "s32": 4, "pred": 1, "u32": 4, "f16": 2, "s8": 1, "u8": 1}
def nbytes(shape_str):
    tot = 0
    for dt, dims in re.findall(r"(bf16|f32|s32|pred|u32|f16|s8|u8)\[([0-9,]*)\]", shape_str):
        n = 1
        for d_ in filter(None, dims.split(",")):
            n *= int(d_)
        tot += n * DT[dt]
    return tot

# entry computation
entry = txt[txt.index("\nENTRY"):]
entry = entry[:entry.index("\n}")]
insts = {}
lines = [l.strip() for l in entry.split("\n")[1:] if "=" in l]
big = B * S * 768
counts = collections.Counter(); traffic = 0; outs = 0; rows = []
for l in lines:
    m = re.match(r"(ROOT )?(%?[\w.\-]+) = (.+?) ([\w\-]+)\((.*)$", l)
    if not m: continue
    name, shape, op, rest = m.group(2), m.group(3), m.group(4), m.group(5)
    insts[name] = shape
    if op in ("parameter", "get-tuple-element", "tuple", "bitcast", "constant"):
        continue
    ops_ = re.findall(r"(%[\w.\-]+)", rest.split("), ")[0] + ")")
    act = lambda sh: nbytes(sh) if re.search(r"\[[0-9,]*\b(%d|%d)\b" % (S, B * S), sh) else 0
    ib = sum(act(insts.get(o, "")) for o in ops_)
    ob = act(shape)
    if ib + ob == 0: continue
    kind = op
    if op == "fusion":
        km = re.search(r"kind=(\w+)", l); kind = "fusion:" + km.group(1)
    counts[kind] += 1
    traffic += ib + ob; outs += ob
    rows.append((ib + ob, name, kind, shape[:80]))
nconcat = len(re.findall(r" concatenate\(", txt))
print(f"B={B} S={S}: top-level ops {dict(counts)}")
print(f"concatenate ops anywhere: {nconcat}")
print(f"activation bytes read+written by top-level ops: {traffic/1e6:.2f} MB  (outputs {outs/1e6:.2f} MB); per token {traffic/(B*S):.0f} B")
big_f32 = [r for r in rows if re.search(r"f32\[%d,%d,(768|1536)\]" % (B, S), r[3]) or re.search(r"f32\[%d,%d,\d+,128\]" % (B, S), r[3])]
print(f"top-level ops with f32 [b,s,768|1536|h,128] outputs: {len(big_f32)}")
for r in sorted(rows, reverse=True)[:int(sys.argv[4]) if len(sys.argv) > 4 else 30]:
    print(f"  {r[0]/1e6:7.2f} MB {r[2]:16s} {r[1]:40s} {r[3]}")
