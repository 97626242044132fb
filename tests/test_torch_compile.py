"""torch.compile on CPU (marked slow: Inductor writes and builds C++ for every region, minutes on 2
cores): the compiled SSD scan and dechunk EMA, FlexAttention's fused kernel, and the regionally
compiled training step (a strict xfail on CPU: its backward aborts natively with torch 2.13)
compute what the eager reference computes; the compiled regions contain no graph breaks, and
recompiles stop after the first steps although every step's chunk counts differ."""

from __future__ import annotations

import copy
import os

import pytest
import torch

from hnet_torch import kernels
from hnet_torch.objective import objective
from hnet_torch.train import compile_counters, compile_model

from conftest import SMALL_CONFIGS, TEXT, random_torch_model

pytestmark = pytest.mark.slow

RATIOS = {"1stage": [4.0], "2stage": [3.0, 3.0], "3stage": [2.0, 2.0, 2.0]}


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def packed_batch(lengths: list[int], offset: int = 0):
    data = torch.tensor(list((TEXT * 4).encode()))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    return data[offset: offset + int(cu[-1])][None], cu


def loss_and_grads(model, ids, cu, ratios):
    model.zero_grad(set_to_none=True)
    out = model(ids, cu_seqlens=cu)
    loss, _ = objective(out, ids, ratios, 0.03, cu_seqlens=cu)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_recompiles_stop_after_the_first_steps_while_chunk_counts_vary(fresh_dynamo):
    """20 steps of packed batches with random document lengths (so every stage's length and
    document count change every step). Dynamo's graph count is backend-independent, so the
    "eager" backend measures it without the C++ build. The 2-stage config has 7 regions (5 stacks,
    2 routing modules): at most 2 graphs each, and none compiled in the last 10 steps. Measured with
    torch 2.13 on CPU: 5 graphs after step 1, 9 after step 6, none after that; no graph breaks."""
    model = compile_model(random_torch_model(SMALL_CONFIGS["2stage"]()).train(), backend="eager")
    g = torch.Generator().manual_seed(0)
    graphs = []
    for step in range(20):
        n = int(torch.randint(2, 5, (1,), generator=g))
        lengths = torch.randint(30, 120, (n,), generator=g).tolist()
        ids, cu = packed_batch(lengths, offset=step)
        loss_and_grads(model, ids, cu, RATIOS["2stage"])
        graphs.append(compile_counters()["graphs"])
    print("graphs after each step:", graphs)
    regions = 7
    assert compile_counters()["graph_breaks"] == 0
    assert graphs[-1] <= 2 * regions, graphs
    assert graphs[-1] == graphs[9], graphs  # nothing compiles any more in the last 10 steps


def test_compiled_ssd_scan_matches_eager_forward_and_gradients():
    """Runs in a child process: before the padding moved out of the compiled function
    (ssd.chunked_scan), Inductor's generated C++ corrupted the heap ("double free or corruption")
    at the first length that was not a chunk multiple; a native abort must fail this test, not end
    the whole session."""
    import subprocess
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    code = "import test_torch_compile as t; t.check_compiled_ssd_scan()"
    proc = subprocess.run([sys.executable, "-c", code], cwd=here, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=os.pathsep.join([here, os.path.dirname(here)])))
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Dynamic shapes: one graph per kind of call, whatever the length. The kinds: SSD or EMA (the
    # EMA's B and C need no gradient), packed or not, one chunk or more (Dynamo specialises size 1).
    # Measured with torch 2.13 on CPU: 6 graphs for the 5 lengths x 2 scans here.
    graphs = int(proc.stdout.split("compiled graphs:")[1].split()[0])
    assert graphs <= 8, proc.stdout


def close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-4) -> bool:
    return bool((a - b).abs().max() <= rel * b.abs().max())


def check_compiled_ssd_scan() -> None:
    """Lengths below, at and between chunk multiples, packed (seq_idx) and not, for the SSD scan and
    the dechunk EMA; prints how many graphs Dynamo compiled."""
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(0)
    for l, packed in ((40, True), (61, True), (5, False), (77, False), (130, True)):
        b, h, p, n = 2, 3, 8, 4
        x = torch.randn(b, l, h, p, generator=g, requires_grad=True)
        dt = (torch.rand(b, l, h, generator=g) * 0.3).requires_grad_()
        A = (-torch.rand(h, generator=g) * 3).requires_grad_()
        B, C = (torch.randn(b, l, 1, n, generator=g, requires_grad=True) for _ in range(2))
        D = torch.randn(h, generator=g, requires_grad=True)
        seq_idx = None
        if packed:
            seq_idx = torch.zeros(b, l, dtype=torch.long)
            seq_idx[:, l // 3:] = 1
            seq_idx[:, l // 2:] = 2
        values = torch.randn(b, l, 6, generator=g, requires_grad=True)
        prob = (torch.rand(b, l, generator=g) * 0.98 + 0.01).requires_grad_()
        inputs = (x, dt, A, B, C, D, values, prob)
        results = []
        for impl in ("pure", "compiled"):
            y, final = kernels.ssd_scan(x, dt, A, B, C, 8, D, seq_idx=seq_idx, mode=f"scan={impl}")
            z = kernels.ema_scan(values, prob, 8, seq_idx=seq_idx, mode=f"scan={impl}")
            loss = (y * torch.cos(y)).sum() + final.sum() + (z * z).sum()
            results.append((y, final, z, torch.autograd.grad(loss, inputs)))
        (y0, f0, z0, g0), (y1, f1, z1, g1) = results
        assert close(y1, y0) and close(f1, f0) and close(z1, z0), l
        for name, a, c in zip("x dt A B C D values prob".split(), g0, g1):
            assert close(c, a), (l, name)
    counters = compile_counters()
    assert counters["graph_breaks"] == 0
    print(f"compiled graphs: {counters['graphs']}")


@pytest.mark.xfail(strict=True, reason="torch 2.13 Inductor on CPU: the compiled regions' backward aborts natively "
                   "(heap corruption); `--compile on` is refused on CPU for this reason")
def test_compiled_training_step_matches_eager_on_cpu():
    """In a child process, so that the native abort fails this test instead of ending the session.
    Strict: once a torch release fixes it this test fails, and the refusal in use_compile can go."""
    import subprocess
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    code = "import test_torch_compile as t; t.check_compiled_training_step('2stage')"
    proc = subprocess.run([sys.executable, "-c", code], cwd=here, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=os.pathsep.join([here, os.path.dirname(here)])))
    assert proc.returncode == 0, proc.stderr[-3000:]


def check_compiled_training_step(name: str) -> None:
    torch._dynamo.reset()
    eager = random_torch_model(SMALL_CONFIGS[name]()).train()
    compiled = compile_model(copy.deepcopy(eager))
    for lengths, offset in (([60, 45, 81], 0), ([33, 120], 7)):  # two steps: different chunk counts
        ids, cu = packed_batch(lengths, offset)
        loss0, grads0 = loss_and_grads(eager, ids, cu, RATIOS[name])
        loss1, grads1 = loss_and_grads(compiled, ids, cu, RATIOS[name])
        assert abs(float(loss1 - loss0)) <= 1e-5 * abs(float(loss0))
        assert grads0.keys() == grads1.keys()
        for key in grads0:
            scale = grads0[key].abs().max().clamp(min=1e-6)
            assert (grads1[key] - grads0[key]).abs().max() <= 1e-3 * scale, key
    assert compile_counters()["graph_breaks"] == 0


def test_fused_flex_attention_matches_sdpa(fresh_dynamo):
    """FlexAttention's compiled (C++ on CPU) kernel, at lengths that are not block multiples."""
    g = torch.Generator().manual_seed(1)
    for l, window, lengths in ((300, 20, [100, 117, 83]), (190, -1, None)):
        q, k, v = (torch.randn(1, l, 2, 16, generator=g) for _ in range(3))
        seq_idx = None if lengths is None else torch.repeat_interleave(torch.arange(3), torch.tensor(lengths))[None]
        ref = kernels.sdpa_attention(q, k, v, window, seq_idx=seq_idx)
        out = kernels.flex_attention(q, k, v, window, seq_idx=seq_idx, fused=True)
        assert (out - ref).abs().max() <= 1e-5


def test_model_with_flex_attention_matches_sdpa_in_packed_inference(fresh_dynamo):
    model = random_torch_model(SMALL_CONFIGS["2stage"]())
    ids, cu = packed_batch([50, 90, 37])
    with torch.no_grad():
        model.set_kernels("off")
        ref = model(ids, cu_seqlens=cu)
        model.set_kernels("off", attention="flex")
        out = model(ids, cu_seqlens=cu)
    assert (out.logits - ref.logits).abs().max() <= 1e-4
    for a, b in zip(out.routing, ref.routing):
        assert torch.equal(a.boundary_mask, b.boundary_mask)
