import torch
import pytest

from dpo_engine.logprobs import naive_token_logps, token_logps


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
