"""Triton head: interpreter runs on the CPU (``TRITON_INTERPRET=1``, in a subprocess so this pytest
process never imports triton in interpreter mode), and native runs on CUDA when there is one.

Every case compares against a float64 naive reference (materialised logits). Block sizes are small
(BLOCK_N=16, BLOCK_V=32, BLOCK_D=16) so N=24, V=100 and d=40 leave ragged edges on every axis; d=16
takes the single-slice path (gradient accumulators in registers), d=40 the multi-slice one."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
# CHUNK_V=64: the gemm backward walks V=100 in two chunks (the second ragged)
BLOCKS = dict(BLOCK_N=16, BLOCK_V=32, BLOCK_D=16, CHUNK_V=64)

# name -> (n, d, v, bias, dtype, with_stats, grad_filter_eps, frozen_weight)
CASES = {
    "fp32_single_d": (24, 16, 100, False, "float32", False, 0.0, False),
    "fp32_single_d_bias": (24, 16, 100, True, "float32", False, 0.0, False),
    "fp32_multi_d": (24, 40, 100, False, "float32", False, 0.0, False),
    "fp32_multi_d_bias_stats": (24, 40, 100, True, "float32", True, 0.0, False),
    "fp32_frozen_weight": (24, 40, 100, True, "float32", False, 0.0, True),
    "bf16_multi_d_bias": (24, 40, 100, True, "bfloat16", False, 0.0, False),
    "fp16_single_d": (24, 16, 100, False, "float16", True, 0.0, False),
    "fp32_filter_on_plain_inputs": (24, 40, 100, True, "float32", False, 2.0 ** -12, False),
    "fp32_single_d_bias_fused": (24, 16, 100, True, "float32", False, 0.0, False),
    "fp32_multi_d_bias_fused": (24, 40, 100, True, "float32", False, 0.0, False),
    "bf16_multi_d_fused": (24, 40, 100, False, "bfloat16", False, 0.0, False),
}
# cases that run the fused backward kernels; the others the default (gemm, or fused when filtering)
TOL = {"float32": 1e-5, "bfloat16": 1e-2, "float16": 1e-2}


def _rel(a, r):
    return ((a.double() - r).norm() / r.norm()).item()


def run_case(name: str, device: str) -> dict:
    """Metrics of one case (relative errors against float64)."""
    from dpo_engine.modeling import naive_token_logps, token_logps
    from dpo_engine.modeling.triton_kernels import triton_token_logps

    n, d, v, bias, dtype, stats, eps, frozen = CASES[name]
    dt = getattr(torch, dtype)
    g = torch.Generator().manual_seed(0)
    h = torch.randn(n, d, generator=g).to(device, dt).requires_grad_()
    w = torch.randn(v, d, generator=g).to(device, dt).requires_grad_(not frozen)
    b = torch.randn(v, generator=g).to(device, dt).requires_grad_() if bias else None
    t = torch.randint(0, v, (n,), generator=g).to(device)
    up = torch.randn(n, generator=g).to(device)
    bwd = "fused" if name.endswith("_fused") else "auto"
    lp, ent, mean, p2, _ = triton_token_logps(h, w, t, b, with_stats=stats, grad_filter_eps=eps,
                                              blocks=BLOCKS, bwd=bwd)
    params = [x for x in (h, w, b) if x is not None and x.requires_grad]
    grads = torch.autograd.grad((lp * up).sum(), params)
    ref_in = [None if x is None else x.detach().double().requires_grad_(x.requires_grad)
              for x in (h, w, b)]
    ref = naive_token_logps(ref_in[0], ref_in[1], t, ref_in[2])
    ref_grads = torch.autograd.grad((ref * up.double()).sum(),
                                    [x for x in ref_in if x is not None and x.requires_grad])
    out = {"logps": _rel(lp, ref), "grads": [_rel(a, r) for a, r in zip(grads, ref_grads)],
           "dtype_ok": lp.dtype == torch.float32 and all(
               a.dtype == p.dtype for a, p in zip(grads, params))}
    if stats:
        logits = ref_in[0].detach() @ ref_in[1].detach().t()
        if bias:
            logits = logits + ref_in[2].detach()
        logp = logits.log_softmax(-1)
        out["entropy"] = _rel(ent, -(logp.exp() * logp).sum(-1))
        out["mean_logit"] = _rel(mean, logits.mean(-1))
        out["log_sum_p2"] = _rel(p2, torch.logsumexp(2 * logp, -1))
    if name == "fp32_single_d_bias":  # dispatch: token_logps(backend="triton") is this kernel
        via = token_logps(h, w, t, b, backend="triton")
        out["dispatch"] = _rel(via.logps, ref)
    return out


def run_filter_case(device: str) -> dict:
    """Tile 1 (columns 32..63, one BLOCK_V) sits ~12 nats below the rest, softmax ~1e-7 < 2^-12,
    and no token targets it: with filtering it is skipped in both backward kernels."""
    from dpo_engine.modeling import naive_token_logps
    from dpo_engine.modeling.triton_kernels import triton_token_logps

    g = torch.Generator().manual_seed(3)
    n, d, v = 24, 16, 96
    h = (0.3 * torch.randn(n, d, generator=g)).to(device).requires_grad_()
    w = (0.3 * torch.randn(v, d, generator=g)).to(device).requires_grad_()
    b = torch.zeros(v)
    b[32:64] = -12.0
    b = b.to(device).requires_grad_()
    t = torch.cat([torch.randint(0, 32, (12,), generator=g),
                   torch.randint(64, 96, (12,), generator=g)]).to(device)
    up = torch.randn(n, generator=g).to(device)
    res = {}
    for eps in (0.0, 2.0 ** -12):
        # fused both times, so the kept tiles must match bit for bit
        lp = triton_token_logps(h, w, t, b, grad_filter_eps=eps, blocks=BLOCKS, bwd="fused")[0]
        res[eps] = torch.autograd.grad((lp * up).sum(), [h, w, b])
    ins = [x.detach().double().requires_grad_() for x in (h, w, b)]
    ref = torch.autograd.grad((naive_token_logps(*ins[:2], t, ins[2]) * up.double()).sum(), ins)
    on, off = res[2.0 ** -12], res[0.0]
    return {"off": [_rel(a, r) for a, r in zip(off, ref)],
            "on": [_rel(a, r) for a, r in zip(on, ref)],
            "skipped_rows_zero": bool(torch.count_nonzero(on[1][32:64]) == 0
                                      and torch.count_nonzero(on[2][32:64]) == 0),
            "unfiltered_rows_nonzero": bool(torch.count_nonzero(off[1][32:64]) > 0),
            "kept_tiles_equal": bool(torch.equal(on[1][:32], off[1][:32])
                                     and torch.equal(on[1][64:], off[1][64:]))}


def run_correct_case(device: str) -> dict:
    """``correct`` (target is an argmax) against float64 logits. N=40 spans 3 token blocks and V=100
    4 vocabulary tiles; gaussian inputs (no ties) with every other target set to the argmax, and
    small-integer inputs (exact integer logits, many ties; targets the last tied max, which a tie
    counts as correct but torch.argmax does not pick)."""
    from dpo_engine.modeling import token_logps
    from dpo_engine.modeling.triton_kernels import triton_token_logps

    g = torch.Generator().manual_seed(7)
    n, d, v = 40, 40, 100
    out = {}
    h, w, b = (torch.randn(*shape, generator=g) for shape in ((n, d), (v, d), (v,)))
    logits = h.double() @ w.double().t() + b.double()
    t = torch.randint(0, v, (n,), generator=g)
    t[::2] = logits.argmax(-1)[::2]
    ref = logits.argmax(-1) == t
    hit = triton_token_logps(*(x.to(device) for x in (h, w, t, b)), with_stats=True,
                             blocks=BLOCKS)[4].cpu()
    via = token_logps(*(x.to(device) for x in (h, w, t, b)), with_stats=True,
                      backend="triton").correct.cpu()  # default blocks, through the dispatch
    out["gauss_mismatch"] = int((hit.bool() != ref).sum())
    out["dispatch_mismatch"] = int((via.bool() != ref).sum())
    out["gauss_hits"] = int(ref.sum())
    out["argmax_tiles"] = len(set((t[::2] // BLOCKS["BLOCK_V"]).tolist()))
    out["values_ok"] = bool(((hit == 0) | (hit == 1)).all() and hit.dtype == torch.float32)
    h = torch.randint(-2, 3, (n, 3), generator=g).float()
    w = torch.randint(-2, 3, (v, 3), generator=g).float()
    logits = (h @ w.t()).double()
    top = logits.max(-1, keepdim=True).values
    t = torch.where(logits == top, torch.arange(v).double(), -1.0).argmax(-1)
    t[1::2] = torch.randint(0, v, (n // 2,), generator=g)
    ref = (logits.gather(1, t[:, None]) == top).squeeze(1)
    hit = triton_token_logps(h.to(device), w.to(device), t.to(device), with_stats=True,
                             blocks=BLOCKS)[4].cpu()
    out["ties_mismatch"] = int((hit.bool() != ref).sum())
    out["ties_exercised"] = bool((ref & (logits.argmax(-1) != t)).any())
    return out


EXTRA = {"filter": run_filter_case, "correct": run_correct_case}


def run_all(device: str) -> dict:
    results = {}
    for name in [*CASES, *EXTRA]:
        try:
            results[name] = EXTRA[name](device) if name in EXTRA else run_case(name, device)
        except Exception as e:  # reported per case by the tests below
            results[name] = {"error": f"{type(e).__name__}: {e}"}
    return results


def check(name: str, m: dict) -> None:
    assert "error" not in m, m.get("error")
    if name == "filter":
        assert max(m["off"]) < 1e-5, m
        assert max(m["on"]) < 1e-5, m  # the skipped part is ~1e-7 of the gradient
        assert m["skipped_rows_zero"] and m["unfiltered_rows_nonzero"] and m["kept_tiles_equal"], m
        return
    if name == "correct":
        assert m["gauss_mismatch"] == m["dispatch_mismatch"] == m["ties_mismatch"] == 0, m
        assert 20 <= m["gauss_hits"] < 40 and m["argmax_tiles"] > 1, m
        assert m["values_ok"] and m["ties_exercised"], m
        return
    tol = TOL[CASES[name][4]]
    assert m["logps"] < tol, m
    assert max(m["grads"]) < tol, m
    assert m["dtype_ok"], m
    for k in ("entropy", "mean_logit", "log_sum_p2", "dispatch"):
        if k in m:
            assert m[k] < tol, (k, m)


HAVE_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed "
                                  "(pip install 'triton>=3.0'; Linux only)")


@pytest.fixture(scope="module")
def interpreter_results():
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, __file__, "cpu"], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@needs_triton
@pytest.mark.parametrize("name", [*CASES, *EXTRA])
def test_interpreter_cpu(interpreter_results, name):
    check(name, interpreter_results[name])


@needs_triton
def test_forced_triton_on_cpu_without_interpreter_is_refused():
    code = ("import torch\nfrom dpo_engine.modeling import token_logps\n"
            "h, w = torch.randn(4, 16), torch.randn(32, 16)\n"
            "t = torch.zeros(4, dtype=torch.long)\n"
            "try:\n    token_logps(h, w, t, backend='triton')\nexcept RuntimeError as e:\n"
            "    print('refused', e)\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**env, "PYTHONPATH": str(ROOT)}, cwd=ROOT, timeout=120)
    assert "refused" in proc.stdout and "TRITON_INTERPRET" in proc.stdout, proc.stderr[-2000:]


@needs_triton
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("name", [*CASES, *EXTRA])
def test_cuda(name):
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        pytest.skip("TRITON_INTERPRET is set in this process")
    result = EXTRA[name]("cuda") if name in EXTRA else run_case(name, "cuda")
    check(name, result)


@needs_triton
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_default_blocks_match_torch_path(dtype):
    """Realistic shape with the default block sizes and the auto backend, against the torch path."""
    from dpo_engine.modeling import token_logps

    g = torch.Generator().manual_seed(0)
    n, d, v = 1000, 576, 49152 + 17
    h = torch.randn(n, d, generator=g).cuda().to(dtype).requires_grad_()
    w = (0.05 * torch.randn(v, d, generator=g)).cuda().to(dtype).requires_grad_()
    t = torch.randint(0, v, (n,), generator=g).cuda()
    a = token_logps(h, w, t, backend="auto", with_stats=True)
    b = token_logps(h, w, t, backend="torch", with_stats=True)
    ga = torch.autograd.grad(a.logps.sum(), [h, w])
    gb = torch.autograd.grad(b.logps.sum(), [h, w])
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert _rel(a.logps, b.logps.double()) < tol
    assert _rel(a.log_sum_p2, b.log_sum_p2.double()) < tol
    for x, y in zip(ga, gb):
        assert _rel(x, y.double()) < tol



@needs_triton
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_model_sequence_logps_auto_matches_torch_backend():
    """A real (tiny Llama) model under bf16 autocast on CUDA, padded and packed: the default
    backend (Triton) gives the torch path's sequence log-probs and parameter gradients."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from dpo_engine.modeling import logps as forward

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=5000, hidden_size=128, intermediate_size=256,
                                         num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2)).cuda()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 5000, (int(n),), generator=g).tolist() for n in (5, 9, 3, 12)]
    comps = [torch.randint(0, 5000, (int(n),), generator=g).tolist() for n in (7, 4, 11, 6)]
    for packed in (False, True):
        batch = (forward.pack if packed else forward.collate)(prompts, comps, 0).to("cuda")
        res = {}
        for backend in ("auto", "torch"):
            model.zero_grad()
            forward.HEAD_BACKEND = backend
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = forward.sequence_logps(model, batch)
            out["logps"].sum().backward()
            res[backend] = (out["logps"].detach().double(),
                            model.lm_head.weight.grad.double().clone(),
                            model.model.layers[0].mlp.up_proj.weight.grad.double().clone())
        forward.HEAD_BACKEND = "auto"
        for a, b in zip(res["auto"], res["torch"]):
            assert _rel(a, b) < 2e-2, (packed, _rel(a, b))


if __name__ == "__main__":  # the interpreter subprocess: print all metrics as one JSON line
    print(json.dumps(run_all(sys.argv[1] if len(sys.argv) > 1 else "cpu")))
