import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dpo_engine.modeling import naive_token_logps, token_logps


def _inputs(n=37, d=16, v=300, dtype=torch.float32, seed=0, bias=False):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g, dtype=dtype, requires_grad=True)
    w = torch.randn(v, d, generator=g, dtype=dtype, requires_grad=True)
    b = torch.randn(v, generator=g, dtype=dtype, requires_grad=True) if bias else None
    t = torch.randint(0, v, (n,), generator=g)
    return h, w, b, t


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("chunk", [7, 128, 1000])
def test_matches_float64_reference_values_and_grads(chunk, bias):
    h, w, b, t = _inputs(bias=bias)
    out = token_logps(h, w, t, b, chunk_size=chunk)
    up = torch.randn(out.logps.shape, generator=torch.Generator().manual_seed(1))
    gh, gw, *gb = torch.autograd.grad((out.logps * up).sum(), [h, w] + ([b] if bias else []))
    h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    b64 = b.detach().double().requires_grad_() if bias else None
    ref = naive_token_logps(h64, w64, t, b64)
    rh, rw, *rb = torch.autograd.grad((ref * up.double()).sum(), [h64, w64] + ([b64] if bias else []))
    rel = lambda a, r: ((a.double() - r).norm() / r.norm()).item()
    assert rel(out.logps, ref) < 1e-5
    assert rel(gh, rh) < 1e-5 and rel(gw, rw) < 1e-5
    if bias:
        assert rel(gb[0], rb[0]) < 1e-5


def test_gradcheck_float64():
    h, w, b, t = _inputs(n=5, d=4, v=23, dtype=torch.float64, bias=True)
    assert torch.autograd.gradcheck(lambda h, w, b: token_logps(h, w, t, b, chunk_size=6).logps,
                                    (h, w, b))


def test_bf16_inputs_accumulate_in_fp32():
    h, w, _, t = _inputs(dtype=torch.bfloat16)
    out = token_logps(h, w, t, chunk_size=64)
    ref = naive_token_logps(h.detach().double(), w.detach().double(), t)
    assert out.logps.dtype == torch.float32
    assert ((out.logps.double() - ref).norm() / ref.norm()).item() < 1e-2


def test_entropy_and_mean_logit():
    h, w, _, t = _inputs()
    out = token_logps(h, w, t, chunk_size=50, with_stats=True)
    logits = (h @ w.t()).double()
    p = logits.softmax(-1)
    ent = -(p * logits.log_softmax(-1)).sum(-1)
    assert torch.allclose(out.entropy.double(), ent, rtol=1e-5, atol=1e-5)
    assert torch.allclose(out.mean_logit.double(), logits.mean(-1), rtol=1e-5, atol=1e-5)


def _rel(a, r):
    return ((a.double() - r).norm() / r.norm()).item()


@pytest.mark.parametrize("token_block", [5, 16, 4096])
def test_token_blocks_match_reference(token_block):
    h, w, b, t = _inputs(bias=True)
    out = token_logps(h, w, t, b, chunk_size=64, token_block=token_block)
    gh, gw, gb = torch.autograd.grad(out.logps.sum(), [h, w, b])
    h64, w64, b64 = (x.detach().double().requires_grad_() for x in (h, w, b))
    ref = naive_token_logps(h64, w64, t, b64)
    rh, rw, rb = torch.autograd.grad(ref.sum(), [h64, w64, b64])
    assert _rel(out.logps, ref) < 1e-5
    assert max(_rel(gh, rh), _rel(gw, rw), _rel(gb, rb)) < 1e-5


@pytest.mark.parametrize("chunk,token_block", [(50, 4096), (7, 10), (1000, 3)])
def test_log_sum_p2_and_stats_across_tiles(chunk, token_block):
    h, w, b, t = _inputs(bias=True)
    out = token_logps(h, w, t, b, chunk_size=chunk, token_block=token_block, with_stats=True)
    logits = (h @ w.t() + b).double()
    logp = logits.log_softmax(-1)
    assert torch.allclose(out.log_sum_p2.double(), torch.logsumexp(2 * logp, -1),
                          rtol=1e-5, atol=1e-5)
    assert torch.allclose(out.entropy.double(), -(logp.exp() * logp).sum(-1), rtol=1e-5, atol=1e-5)
    assert torch.allclose(out.mean_logit.double(), logits.mean(-1), rtol=1e-5, atol=1e-5)
    # the stats carry no gradient; logps does
    assert not out.log_sum_p2.requires_grad and out.logps.requires_grad
    no_stats = token_logps(h, w, t, b, chunk_size=chunk, token_block=token_block)
    assert no_stats.log_sum_p2 is None and torch.equal(no_stats.logps, out.logps)


def _argmax_targets(h, w, b, every=2, seed=5):
    """Random targets, except every ``every``-th token targets its float64 argmax."""
    logits = (h @ w.t() + (0 if b is None else b)).detach().double()
    t = torch.randint(0, w.shape[0], (h.shape[0],), generator=torch.Generator().manual_seed(seed))
    t[::every] = logits.argmax(-1)[::every]
    return t, logits


@pytest.mark.parametrize("chunk,token_block", [(7, 10), (64, 4096), (1000, 3)])
def test_correct_matches_float64_argmax(chunk, token_block):
    """Several vocabulary tiles and token blocks; the argmax targets land in different tiles."""
    h, w, b, _ = _inputs(bias=True)
    t, logits = _argmax_targets(h, w, b)
    out = token_logps(h, w, t, b, chunk_size=chunk, token_block=token_block, with_stats=True)
    ref = (logits.argmax(-1) == t).to(out.correct.dtype)
    assert torch.equal(out.correct, ref)
    assert out.correct[::2].all() and ref.sum() < len(t)  # both outcomes occur
    if chunk < w.shape[0]:
        assert len(set((t[::2] // chunk).tolist())) > 1
    assert not out.correct.requires_grad and out.logps.requires_grad
    assert token_logps(h, w, t, b, chunk_size=chunk).correct is None


def test_correct_counts_ties():
    """Small integer inputs give exact integer logits and many tied maxima: a target tied with the
    max counts as correct even where torch.argmax picks another (the first) tied id."""
    g = torch.Generator().manual_seed(6)
    n, d, v = 64, 3, 50
    h = torch.randint(-2, 3, (n, d), generator=g).float()
    w = torch.randint(-2, 3, (v, d), generator=g).float()
    logits = (h @ w.t()).double()
    top = logits.max(-1, keepdim=True).values
    # each token targets the last of its tied maxima (torch.argmax returns the first)
    t = torch.where(logits == top, torch.arange(v).double(), -1.0).argmax(-1)
    t[1::2] = torch.randint(0, v, (n // 2,), generator=g)
    out = token_logps(h, w, t, chunk_size=16, token_block=8, with_stats=True)
    ref = (logits.gather(1, t[:, None]) == top).squeeze(1)
    assert torch.equal(out.correct.bool(), ref)
    assert (ref & (logits.argmax(-1) != t)).any()  # some ties are exercised


@pytest.mark.parametrize("bad", [300, 1000, -1])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_target_ids_outside_vocab_are_refused(bad, backend):
    """Checked before dispatch, so the Triton backend refuses them too (even on CPU tensors)."""
    h, w, b, t = _inputs(bias=True)  # V = 300
    t[5] = bad
    with pytest.raises(ValueError, match=rf"target id {bad} .*V=300"):
        token_logps(h, w, t, b, backend=backend)
    t[5] = 299  # the last valid id is accepted
    token_logps(h, w, t, b, backend="torch")
    empty = token_logps(h[:0], w, t[:0], b)  # no targets: nothing to check
    assert empty.logps.shape == (0,)


def _filter_inputs():
    """V=96 in three tiles of 32; tile 1 (columns 32..63) is pushed down by a -12 bias so its
    softmax probabilities are ~1e-7 < 2^-12. Token 0 targets column 40 (inside that tile)."""
    g = torch.Generator().manual_seed(3)
    n, d, v = 24, 8, 96
    h = (0.3 * torch.randn(n, d, generator=g)).requires_grad_()
    w = (0.3 * torch.randn(v, d, generator=g)).requires_grad_()
    bias = torch.zeros(v)
    bias[32:64] = -12.0
    bias.requires_grad_()
    t = torch.cat([torch.randint(0, 32, (n // 2,), generator=g),
                   torch.randint(64, 96, (n - n // 2,), generator=g)])
    t[0] = 40
    return h, w, bias, t


def test_gradient_filtering_skips_negligible_tiles():
    from dpo_engine.modeling import CCE_FILTER_EPS
    h, w, b, t = _filter_inputs()
    up = torch.randn(t.shape, generator=torch.Generator().manual_seed(4))
    grads = {}
    for eps in (0.0, CCE_FILTER_EPS):
        out = token_logps(h, w, t, b, chunk_size=32, token_block=8, grad_filter_eps=eps)
        grads[eps] = torch.autograd.grad((out.logps * up).sum(), [h, w, b])
    ins = [x.detach().double().requires_grad_() for x in (h, w, b)]
    ref = torch.autograd.grad((naive_token_logps(*ins[:2], t, ins[2]) * up.double()).sum(), ins)
    exact, filt = grads[0.0], grads[CCE_FILTER_EPS]
    for a, r in zip(exact, ref):  # off: exact
        assert _rel(a, r) < 1e-5
    for a, r in zip(filt, ref):  # on: the dropped part is ~1e-7 of the gradient
        assert _rel(a, r) < 1e-5
    gw, gb = filt[1], filt[2]
    # in the filtered tile only the one-hot part survives: row 40 gets up[0] * h[0], exactly
    assert torch.allclose(gw[40], up[0] * h[0].detach(), rtol=1e-6, atol=0)
    assert gb[40].item() == pytest.approx(up[0].item(), rel=1e-6)
    others = torch.cat([torch.arange(32, 40), torch.arange(41, 64)])
    assert torch.count_nonzero(gw[others]) == 0 and torch.count_nonzero(gb[others]) == 0
    assert torch.count_nonzero(exact[1][others]) > 0  # without filtering they are not skipped
    # tiles above eps are untouched
    assert torch.equal(filt[1][:32], exact[1][:32]) and torch.equal(filt[1][64:], exact[1][64:])


def test_backend_argument():
    h, w, b, t = _inputs(bias=True)
    auto = token_logps(h, w, t, b, chunk_size=64)  # CPU tensors: "auto" is the torch path
    torch_ = token_logps(h, w, t, b, chunk_size=64, backend="torch")
    assert torch.equal(auto.logps, torch_.logps)
    with pytest.raises(ValueError, match="backend"):
        token_logps(h, w, t, b, backend="cuda")
    with pytest.raises(ValueError, match="grad_filter_eps"):
        token_logps(h, w, t, b, grad_filter_eps=-1.0)


_MEMORY_SCRIPT = r"""
import sys, time, torch
from dpo_engine.modeling import token_logps

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

torch.set_num_threads(2)
g = torch.Generator().manual_seed(0)
d = 64
chunk, token_block = map(int, sys.argv[1].split("x"))

def peak_extra(n, v):
    h = torch.randn(n, d, generator=g, requires_grad=True)
    w = torch.randn(v, d, generator=g, requires_grad=True)
    t = torch.randint(0, v, (n,), generator=g)
    base = status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
    token_logps(h, w, t, chunk_size=chunk, token_block=token_block).logps.sum().backward()
    return status("VmHWM") - base

peak_extra(64, 256)  # warm-up (thread pools, allocator)
# the larger V*N case first: each case resets the peak, and the smaller one must not profit from it
print(*(peak_extra(int(n), int(v)) for n, v in (a.split("x") for a in sys.argv[2:])))
"""

# name -> (N, V) of the large case, (chunk, token_block); the small case is N = V = 4096
MEMORY_CASES = {
    "vocab": ((4096, 32768), (4096, 4096)),
    "tokens": ((16384, 4096), (4096, 2048)),  # 8 token blocks instead of 2
}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self (Linux)")
@pytest.mark.parametrize("grow", list(MEMORY_CASES))
def test_peak_memory_bounded_by_tile_not_by_vocab_times_tokens(grow):
    """Forward + backward at d=64, growing V (N=4k, V=32k; 4096 x 4096 tiles) or N (N=16k, V=4k;
    2048 x 4096 tiles): naive logits alone are 0.5 / 0.25 GB, above the bound (and log-softmax
    plus its gradient as much again each). The head's peak extra RSS stays around two
    token_block x chunk fp32 tiles (a logits tile and its exp) and is the same at N = V = 4096
    (8x / 4x smaller V*N)."""
    (n, v), (chunk, block) = MEMORY_CASES[grow]
    proc = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, f"{chunk}x{block}", f"{n}x{v}",
                           "4096x4096"], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[1])
    if proc.returncode and "clear_refs" in proc.stderr:
        pytest.skip(f"cannot reset the peak RSS here: {proc.stderr.strip().splitlines()[-1]}")
    assert proc.returncode == 0, proc.stderr
    big, small = map(int, proc.stdout.split())
    naive_logits = n * v * 4
    tile = block * chunk * 4
    assert naive_logits > 2 * 3 * tile  # materialised logits alone would break the bound twice
    assert big < naive_logits / 2, (big, naive_logits)
    assert big < 3 * tile, (big, tile)
    assert big < 1.25 * small + 16 * 2**20, (big, small)  # does not grow with V*N
