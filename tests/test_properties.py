"""Property-based tests (hypothesis) of every public op against float64 math written here, independently of the code
under test: random shapes (0 and 1 included), dtypes, strides, ragged lengths (0 and 1), ties, NaN and +-inf.

NaN semantics checked (the ops' docstrings): NaN in, NaN out wherever torch's counterpart gives NaN:
  - varlen_attention / cross_attention: a query whose scores hold NaN/+inf (or only -inf) outputs NaN; NaN/inf in v
    poisons the queries that see that key; a query that sees no key outputs exact zeros, lse -inf;
  - topk_indices / topk_patch_gather: NaN scores sort last, ties go to the lower index; pixels (NaN included) are
    copied bit for bit; an embedded token with a NaN pixel is NaN;
  - exit_compact: a row holding NaN or +inf, or only -inf, has NaN confidence and never exits;
  - exit_scatter / compact_rows: bit-exact copies (duplicates in exit_scatter: the last occurrence wins).
Accuracy bar (the project's): error vs float64 at most 2x that of plain PyTorch in the same dtype (+ a few ulps).

Examples per test: LOOKFAST_FUZZ_EXAMPLES (default 150 in CI; e.g. 5000 for a nightly-style run). Failing examples
are printed with a reproduction blob (hypothesis' print_blob).
"""
import math
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lookfast
from lookfast.ops.exit_compact import compact_rows

EXAMPLES = int(os.environ.get("LOOKFAST_FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, print_blob=True, derandomize=False,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
FLOATS = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
EPS = {d: torch.finfo(d).eps for d in FLOATS}
SPECIALS = {"nan": float("nan"), "inf": float("inf"), "-inf": -float("inf")}


def _gen(draw_seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(draw_seed)


def _tensor(shape, dtype, gen, ties=False, layout="contiguous", scale=1.0):
    """Random values in `dtype` with the requested memory layout (same values whatever the layout)."""
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * scale
    if ties:
        x = torch.round(x * 2) / 2  # few distinct values: many exact ties
    x = x.to(dtype)
    if layout == "strided" and len(shape) >= 1:  # every other element of a wider buffer
        buf = torch.full((*shape[:-1], 2 * shape[-1]), float("nan"), dtype=dtype) if dtype.is_floating_point \
            else torch.zeros((*shape[:-1], 2 * shape[-1]), dtype=dtype)
        buf[..., ::2] = x
        return buf[..., ::2]
    if layout == "transposed" and len(shape) >= 2:  # same shape, dims 0 and 1 swapped in memory
        return x.transpose(0, 1).contiguous().transpose(0, 1)
    return x


def _poison(x, gen, kind, count):
    """Put `count` entries of a special value at random positions (in place on a copy)."""
    if kind == "none" or x.numel() == 0:
        return x
    y = x.clone()
    flat = y.view(-1) if y.is_contiguous() else None
    pos = torch.randint(0, x.numel(), (count,), generator=gen)
    if flat is None:
        y = y.contiguous()
        flat = y.view(-1)
    flat[pos] = SPECIALS[kind]
    return y


def _close_to_truth(ours, plain, truth, dtype, floor_scale=1.0):
    """Finite entries: |ours - truth| <= 2 |plain - truth| + a few ulps of dtype (the project's bar). Where plain
    torch gives NaN for a finite truth its error there counts as infinite (seen with torch's bf16 matmul on AMX, a
    NaN in one query row reaching other rows): that draw then checks only that ours is finite there (the callers'
    NaN-pattern check against the float64 truth)."""
    mask = torch.isfinite(truth)
    if not mask.any():
        return
    err = (ours.double() - truth)[mask].abs().max().item()
    base = (plain.double() - truth)[mask].abs().nan_to_num(nan=math.inf).max().item()
    floor = 8 * EPS[dtype] * max(1.0, floor_scale)
    assert err <= 2 * base + floor, f"error {err:.3g} vs plain {dtype} {base:.3g} (floor {floor:.3g})"


# ------------------------------------------------------------------------------------------ varlen_attention
def _attention_truth(q, k, v, lens_q, lens_k, scale, causal, compute):
    """softmax(q k^T * scale) v per sample in `compute` (float64 = the truth); queries seeing no key give zeros."""
    H, Hk = q.shape[1], k.shape[1]
    g = H // Hk
    outs, lses, nones = [], [], []
    oq = ok = 0
    for lq, lk in zip(lens_q, lens_k):
        qs = q[oq:oq + lq].to(compute).transpose(0, 1)
        ks = k[ok:ok + lk].to(compute).transpose(0, 1).repeat_interleave(g, 0)
        vs = v[ok:ok + lk].to(compute).transpose(0, 1).repeat_interleave(g, 0)
        s = (qs @ ks.transpose(1, 2)) * scale
        i = torch.arange(lq)[:, None]
        j = torch.arange(lk)[None, :]
        seen = (j <= i + lk - lq) if causal else torch.ones(lq, lk, dtype=torch.bool)
        s = s.masked_fill(~seen, -math.inf)
        none = ~seen.any(1)
        p = torch.softmax(torch.where(none[None, :, None], torch.zeros((), dtype=compute), s), -1)
        p = p.masked_fill(~seen, 0)
        o = torch.where(none[None, :, None], torch.zeros((), dtype=compute), p @ vs)
        lse = torch.logsumexp(s, -1) if lk else torch.full((H, lq), -math.inf, dtype=compute)
        outs.append(o.transpose(0, 1))
        lses.append(torch.where(none[None, :], -math.inf, lse))
        nones.append(none)
        oq, ok = oq + lq, ok + lk
    out = torch.cat(outs) if outs else torch.zeros(0, H, v.shape[2], dtype=compute)
    lse = torch.cat(lses, 1) if lses else torch.zeros(H, 0, dtype=compute)
    _attention_truth.sees_no_key = torch.cat(nones) if nones else torch.zeros(0, dtype=torch.bool)
    return out, lse


@FUZZ
@given(data=st.data())
def test_varlen_attention_property(data):
    dtype = data.draw(st.sampled_from(FLOATS), "dtype")
    batch = data.draw(st.integers(0, 4), "batch")
    lens_q = data.draw(st.lists(st.integers(0, 21), min_size=batch, max_size=batch), "lens_q")
    lens_k = data.draw(st.lists(st.integers(0, 21), min_size=batch, max_size=batch), "lens_k")
    hk = data.draw(st.integers(1, 2), "kv_heads")
    heads = hk * data.draw(st.integers(1, 3), "group")
    dh = data.draw(st.sampled_from([1, 3, 8, 16, 17, 64]), "head_dim")
    dv = data.draw(st.sampled_from([0, 1, 5, 8, 16, 64]), "v_dim")
    causal = data.draw(st.booleans(), "causal")
    scale = data.draw(st.one_of(st.none(), st.floats(0.05, 2.0)), "softmax_scale")
    ties = data.draw(st.booleans(), "ties")
    layout = data.draw(st.sampled_from(["contiguous", "strided", "transposed"]), "layout")
    special = data.draw(st.sampled_from(["none", "none", "q:nan", "k:nan", "q:inf", "k:-inf", "v:nan", "v:inf"]))
    if causal and special.startswith("v"):
        special = "none"  # see the docstring: with causal masking a masked key's 0 weight may meet a NaN value
    gen = _gen(data.draw(st.integers(0, 2**31 - 1), "seed"))
    tq, tk = sum(lens_q), sum(lens_k)
    q = _tensor((tq, heads, dh), dtype, gen, ties, layout)
    k = _tensor((tk, hk, dh), dtype, gen, ties, layout)
    v = _tensor((tk, hk, dv), dtype, gen, ties, layout)
    if special != "none":
        which, kind = special.split(":")
        t = {"q": q, "k": k, "v": v}[which]
        t = _poison(t, gen, kind, 1 + int(torch.randint(0, 3, (1,), generator=gen)))
        q, k, v = (t if which == "q" else q), (t if which == "k" else k), (t if which == "v" else v)
    cu_q = torch.tensor([0] + [sum(lens_q[:i + 1]) for i in range(batch)], dtype=torch.int32)
    cu_k = torch.tensor([0] + [sum(lens_k[:i + 1]) for i in range(batch)], dtype=torch.int32)
    out, lse = lookfast.varlen_attention(q, k, v, cu_q, cu_k, max(lens_q, default=0), max(lens_k, default=0),
                                         softmax_scale=scale, causal=causal, return_lse=True)
    s = scale if scale is not None else 1 / math.sqrt(dh)
    truth, truth_lse = _attention_truth(q, k, v, lens_q, lens_k, s, causal, torch.float64)
    unseen = _attention_truth.sees_no_key  # (total_q,) queries that see no key
    assert out.shape == truth.shape and out.dtype == dtype and lse.shape == truth_lse.shape
    assert torch.equal(out.isnan(), truth.isnan()), "NaN pattern differs from float64 softmax"
    plain, _ = _attention_truth(q, k, v, lens_q, lens_k, s, causal, dtype)
    # A few ulps of the largest score carry into the exponent (the kernels fold scale * log2(e) into q and use a
    # ~2e-7 exp2): the floor scales with it and with |v|.
    fq, fk, fv = (t.double().nan_to_num(0, 0, 0) for t in (q, k, v))
    smax = (fq.abs().amax() * fk.abs().amax() * dh * abs(s)).item() if fq.numel() and fk.numel() else 0.0
    vmax = fv.abs().amax().item() if fv.numel() else 0.0
    _close_to_truth(out, plain, truth, dtype, floor_scale=(1 + smax) * max(vmax, 1.0))
    assert (lse[:, unseen] == -math.inf).all()
    assert torch.equal(lse.isnan() | (lse == math.inf), truth_lse.isnan() | (truth_lse == math.inf))
    assert torch.equal(lse == -math.inf, truth_lse == -math.inf)
    fin = torch.isfinite(truth_lse)
    if fin.any():
        tol = 1e-5 if dtype != torch.float64 else 1e-6
        assert (lse[fin].double() - truth_lse[fin]).abs().max() <= tol * (1 + truth_lse[fin].abs().max())
    # queries that see no key: exact zeros, whatever v holds
    assert torch.equal(out[unseen], torch.zeros_like(out[unseen]))


@FUZZ
@given(data=st.data())
def test_cross_attention_property(data):
    dtype = data.draw(st.sampled_from(FLOATS), "dtype")
    b, lq, lk = data.draw(st.integers(0, 3)), data.draw(st.integers(0, 9)), data.draw(st.integers(0, 9))
    hk = data.draw(st.integers(1, 2))
    heads = hk * data.draw(st.integers(1, 2))
    dh, dv = data.draw(st.sampled_from([1, 8, 16, 24])), data.draw(st.sampled_from([1, 8, 13]))
    gen = _gen(data.draw(st.integers(0, 2**31 - 1), "seed"))
    q = _tensor((b, lq, heads, dh), dtype, gen)
    k = _tensor((b, lk, hk, dh), dtype, gen)
    v = _tensor((b, lk, hk, dv), dtype, gen)
    use_lengths = data.draw(st.booleans(), "kv_lengths")
    lengths = torch.randint(0, lk + 1, (b,), generator=gen) if use_lengths else None
    out = lookfast.cross_attention(q, k, v, lengths)
    lens = lengths.tolist() if use_lengths else [lk] * b
    kk = torch.cat([k[i, :n] for i, n in enumerate(lens)]) if b else k.reshape(0, hk, dh)
    vv = torch.cat([v[i, :n] for i, n in enumerate(lens)]) if b else v.reshape(0, hk, dv)
    truth, _ = _attention_truth(q.reshape(b * lq, heads, dh), kk, vv, [lq] * b, lens, 1 / math.sqrt(dh), False,
                                torch.float64)
    plain, _ = _attention_truth(q.reshape(b * lq, heads, dh), kk, vv, [lq] * b, lens, 1 / math.sqrt(dh), False, dtype)
    assert out.shape == (b, lq, heads, dv)
    _close_to_truth(out.reshape(b * lq, heads, dv), plain, truth, dtype)


# ------------------------------------------------------------------------------------------ topk / gather
def _order(row):
    """Indices of a score row best first: descending, ties to the lower index, NaN last (Python floats, exact)."""
    vals = [float(x) for x in row]
    return sorted(range(len(vals)), key=lambda j: (math.isnan(vals[j]), -vals[j] if not math.isnan(vals[j]) else 0, j))


def _scores(data, gen, b, n):
    dtype = data.draw(st.sampled_from(FLOATS), "scores dtype")
    s = _tensor((b, n), dtype, gen, ties=data.draw(st.booleans(), "ties"),
                layout=data.draw(st.sampled_from(["contiguous", "strided", "transposed"]), "scores layout"))
    for kind in ("nan", "inf", "-inf"):
        if data.draw(st.booleans(), kind) and s.numel():
            s = _poison(s, gen, kind, 1 + s.numel() // 5)
    return s


@FUZZ
@given(data=st.data())
def test_topk_indices_property(data):
    gen = _gen(data.draw(st.integers(0, 2**31 - 1), "seed"))
    b, n = data.draw(st.integers(0, 5), "B"), data.draw(st.integers(0, 40), "N")
    s = _scores(data, gen, b, n)
    expected = [_order(row) for row in s.tolist()]
    if data.draw(st.booleans(), "ragged"):
        counts = torch.randint(0, n + 1, (b,), generator=gen, dtype=data.draw(st.sampled_from([torch.int32, torch.int64])))
        idx, cu = lookfast.topk_indices(s, counts)
        got = [idx[cu[i]:cu[i + 1]].tolist() for i in range(b)]
        assert got == [e[:c] for e, c in zip(expected, counts.tolist())]
    else:
        k = data.draw(st.integers(0, n), "k")
        idx = lookfast.topk_indices(s, k)
        assert idx.shape == (b, k) and idx.tolist() == [e[:k] for e in expected]


@FUZZ
@given(data=st.data())
def test_topk_patch_gather_property(data):
    gen = _gen(data.draw(st.integers(0, 2**31 - 1), "seed"))
    dtype = data.draw(st.sampled_from(FLOATS), "dtype")
    b, c = data.draw(st.integers(0, 3), "B"), data.draw(st.integers(1, 4), "C")
    p = data.draw(st.integers(1, 5), "patch_size")
    gh, gw = data.draw(st.integers(0, 4), "Gh"), data.draw(st.integers(0, 4), "Gw")
    images = _tensor((b, c, gh * p, gw * p), dtype, gen)
    if data.draw(st.booleans(), "channels_last"):
        images = images.contiguous(memory_format=torch.channels_last)
    elif data.draw(st.booleans(), "strided images"):
        images = _tensor((b, c, gh * p, gw * p), dtype, gen, layout="strided")
    if data.draw(st.booleans(), "nan pixels") and images.numel():
        images = _poison(images, gen, data.draw(st.sampled_from(["nan", "inf"])), 2)
    scores = _scores(data, gen, b, gh * gw)
    ragged = data.draw(st.booleans(), "ragged")
    k = torch.randint(0, gh * gw + 1, (b,), generator=gen) if ragged else data.draw(st.integers(0, gh * gw), "k")
    embed = data.draw(st.booleans(), "embed")
    weight = bias = pos = None
    d = data.draw(st.integers(1, 9), "D")
    if embed:
        weight = _tensor((d, c, p, p), dtype, gen, scale=0.3)
        bias = _tensor((d,), dtype, gen) if data.draw(st.booleans(), "bias") else None
        if data.draw(st.booleans(), "pos_embed"):
            pos = _tensor((gh * gw, d), dtype, gen)
            if data.draw(st.booleans(), "pos 3-D"):
                pos = pos[None]
    result = lookfast.topk_patch_gather(images, scores, k, p, weight, bias, pos)
    order = [_order(row) for row in scores.tolist()]
    counts = k.tolist() if ragged else [k] * b
    picked = [(i, j) for i in range(b) for j in order[i][:counts[i]]]
    idx = result[0]
    assert (idx.tolist() if ragged else idx.reshape(-1).tolist()) == [j for _, j in picked]
    tokens = result[1].reshape(len(picked), result[1].shape[-1])
    # float64 truth: (C, p, p) patches, then the embedding in float64
    x = images.double()
    patches = torch.stack([x[i, :, (j // gw) * p:(j // gw + 1) * p, (j % gw) * p:(j % gw + 1) * p].reshape(-1)
                           for i, j in picked]) if picked else torch.zeros(0, c * p * p, dtype=torch.float64)
    if not embed:
        assert tokens.dtype == dtype
        torch.testing.assert_close(tokens.double(), patches, rtol=0, atol=0, equal_nan=True)  # bit-exact copies
        return
    pos2 = None if pos is None else pos.reshape(gh * gw, d)
    def embed_in(t, cdt):
        y = t.to(cdt) @ weight.reshape(d, -1).to(cdt).t()
        if bias is not None:
            y = y + bias.to(cdt)
        if pos2 is not None:
            y = y + pos2.to(cdt)[[j for _, j in picked]]
        return y
    truth = embed_in(patches, torch.float64)
    plain = embed_in(patches.to(dtype), dtype)
    assert tokens.shape == truth.shape and tokens.dtype == dtype
    assert torch.equal(tokens.isnan(), truth.isnan())
    _close_to_truth(tokens, plain, truth, dtype, floor_scale=c * p * p)


# ------------------------------------------------------------------------------------------ exit_compact
def _confidence_truth(x, criterion):
    """float64 confidence per row; NaN for a row with NaN or +inf or only -inf (the documented semantics)."""
    out = []
    for row in x.double().tolist():
        if any(math.isnan(v) or v == math.inf for v in row) or all(v == -math.inf for v in row):
            out.append(math.nan)
            continue
        m = max(row)
        e = [math.exp(v - m) if v != -math.inf else 0.0 for v in row]
        s = sum(e)
        ps = sorted((w / s for w in e), reverse=True)
        if criterion == "max_softmax":
            out.append(ps[0])
        elif criterion == "margin":
            out.append(ps[0] - (ps[1] if len(ps) > 1 else 0.0))
        else:
            out.append(-sum(w * math.log(w) for w in ps if w > 0))
    return out


@FUZZ
@given(data=st.data())
def test_exit_compact_property(data):
    gen = _gen(data.draw(st.integers(0, 2**31 - 1), "seed"))
    dtype = data.draw(st.sampled_from(FLOATS), "dtype")
    n, classes = data.draw(st.integers(0, 30), "n"), data.draw(st.integers(1, 40), "classes")
    criterion = data.draw(st.sampled_from(["max_softmax", "entropy", "margin"]), "criterion")
    logits = _tensor((n, classes), dtype, gen, ties=data.draw(st.booleans(), "ties"),
                     layout=data.draw(st.sampled_from(["contiguous", "strided", "transposed"])), scale=3.0)
    for kind in ("nan", "inf", "-inf"):
        if data.draw(st.booleans(), kind) and logits.numel():
            logits = _poison(logits, gen, kind, 1 + logits.numel() // 20)
    if n and data.draw(st.booleans(), "a row of -inf"):
        logits = logits.clone()
        logits[int(torch.randint(0, n, (1,), generator=gen))] = -math.inf
    conf = _confidence_truth(logits, criterion)
    finite = [c for c in conf if not math.isnan(c)]
    if finite and data.draw(st.booleans(), "threshold at a confidence"):
        thr = finite[data.draw(st.integers(0, len(finite) - 1))]
    else:
        thr = data.draw(st.floats(-0.5, 4.0), "threshold")
    thr_arg = torch.tensor(thr) if data.draw(st.booleans(), "tensor threshold") else thr
    state_dtype = data.draw(st.sampled_from([torch.float32, torch.bfloat16, torch.int64, torch.bool, torch.float64]))
    width = data.draw(st.sampled_from([0, 1, 7, 300]), "state width")
    state = torch.randint(0, 100, (n, width, 2), generator=gen).to(state_dtype)
    strided = data.draw(st.booleans(), "strided state")
    if strided:
        state = state.transpose(1, 2)
    keep, exited, compacted = lookfast.exit_compact(logits, thr_arg, state, criterion=criterion)
    assert sorted(keep.tolist() + exited.tolist()) == list(range(n))
    assert keep.tolist() == sorted(keep.tolist()) and exited.tolist() == sorted(exited.tolist())
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    leaves = set(exited.tolist())
    for i, c in enumerate(conf):
        if math.isnan(c):
            assert i not in leaves, f"row {i} has NaN confidence but exited"
        elif abs(c - thr) > tol * (1 + abs(thr)):  # rows within rounding of the threshold may go either way
            expect = c <= thr if criterion == "entropy" else c >= thr
            assert (i in leaves) == expect, (i, c, thr)
    assert torch.equal(compacted, state[keep])
    if strided and width > 1:  # rows that are dense blocks in another order keep it (docs/ops.md section 3)
        assert compacted.stride() == (2 * width, 1, 2), compacted.stride()
    else:
        assert compacted.is_contiguous()


@FUZZ
@given(data=st.data())
def test_exit_scatter_and_compact_rows_property(data):
    gen = _gen(data.draw(st.integers(0, 2**31 - 1), "seed"))
    dtype = data.draw(st.sampled_from(FLOATS + [torch.int32, torch.bool]), "dtype")
    rows, width = data.draw(st.integers(0, 12), "rows"), data.draw(st.sampled_from([0, 1, 3, 64, 1000]), "width")
    k = data.draw(st.integers(0, 16), "k") if rows else 0
    index = torch.randint(0, max(rows, 1), (k,), generator=gen)  # duplicates likely
    out = _tensor((rows, width), torch.float64, gen).to(dtype)
    values = _tensor((k, width), torch.float64, gen).to(dtype)
    if dtype.is_floating_point and values.numel() and data.draw(st.booleans(), "nan values"):
        values = _poison(values, gen, "nan", 3)
    layout = data.draw(st.sampled_from(["contiguous", "transposed out", "strided values"]), "layout")
    if layout == "transposed out" and rows:
        out = out.t().contiguous().t()
    elif layout == "strided values" and k:
        values = torch.stack([values, values], 1)[:, 0]
    expected = out.clone()
    for j, r in enumerate(index.tolist()):
        expected[r] = values[j]  # sequential: the last duplicate wins
    res = lookfast.exit_scatter(out, index, values)
    assert res is out
    torch.testing.assert_close(out, expected, rtol=0, atol=0, equal_nan=True)
    keep = torch.randint(0, max(rows, 1), (data.draw(st.integers(0, 10)) if rows else 0,), generator=gen)
    got = compact_rows([out, out[:, :1] if width else out], keep)
    torch.testing.assert_close(got[0], out[keep], rtol=0, atol=0, equal_nan=True)


@FUZZ
@given(data=st.data())
def test_calibration_is_reproduced_by_the_runner_property(data):
    gen = _gen(data.draw(st.integers(0, 2**31 - 1), "seed"))
    dtype = data.draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16]), "dtype")
    exits, n, classes = data.draw(st.integers(1, 4)), data.draw(st.integers(0, 40)), data.draw(st.integers(1, 12))
    logits = _tensor((exits, n, classes), dtype, gen, ties=data.draw(st.booleans(), "ties"), scale=2.0)
    w = [data.draw(st.integers(0, 5)) for _ in range(exits)]
    if sum(w) == 0:
        w[-1] = 1
    p = [x / sum(w) for x in w]
    p[-1] = 1.0 - sum(p[:-1])
    t = lookfast.calibrate_thresholds(logits, p)
    # the calibration's promise, checked on the runner's own exits: each exit e < E-1 takes at least
    # floor(n * p_e) samples when that many remain with finite confidence, and every threshold is attained
    stages = [lambda s: s] * exits
    heads = [lambda s, e=e: logits[e][s[0]] for e in range(exits)]
    exit_index = lookfast.EarlyExitRunner(stages, heads)((torch.arange(n),), t.tolist())[1]
    counts = torch.bincount(exit_index, minlength=exits).tolist() if n else [0] * exits
    remaining = n
    for e in range(exits - 1):
        kk = math.floor(n * p[e])
        if math.isinf(t[e].item()):
            assert counts[e] == 0
        else:
            assert counts[e] >= kk and kk > 0, (e, counts, kk)
        remaining -= counts[e]
    assert sum(counts) == n
