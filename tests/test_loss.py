"""Loss backends: every fused path matches the full-logits reference for every head and option."""

from __future__ import annotations

import importlib.util
import json
import warnings

import pytest
import torch
import torch.nn.functional as F

from lmheads import loss as loss_module
from lmheads.backbone import BackboneConfig
from lmheads.errors import ConfigError
from lmheads.heads import (
    LinearForm,
    LinearHead,
    TiedBiasHead,
    TiedHead,
    UntiedHead,
    head_class,
    registered_heads,
)
from lmheads.heads.mixture import MixtureOfSoftmaxesHead
from lmheads.loss import (
    IGNORE_INDEX,
    ChunkGrad,
    chunk_tokens,
    chunked_token_loss,
    chunked_train_loss,
    get_backend,
    naive_linear_cross_entropy,
    reduce_token_loss,
)
from lmheads.module import LMHeadModule

V, D, B, T = 61, 24, 3, 10  # N = 30 tokens: chunks of 7 and 16 do not divide it
LINEAR = sorted(
    n for n, c in registered_heads().items() if c.__module__.startswith("lmheads.") and n != "mos"
)
OPTIONS = {
    "plain": {},
    "softcap": {"softcap": 0.3},
    "inv_sqrt_d_and_z_loss": {"logit_scale": "inv_sqrt_d", "z_loss": 1e-2},
    "softcap_and_z_loss": {"softcap": 2.0, "z_loss": 1e-3, "logit_scale": 3.0},
}


def model(head, backend: str, chunk: int | None = None) -> LMHeadModule:
    torch.manual_seed(0)
    cfg = BackboneConfig(n_layer=1, n_head=2, d_model=D, block_size=T)
    module = LMHeadModule(head=head, backbone=cfg, vocab_size=V, loss_backend=backend, loss_chunk_size=chunk)
    with torch.no_grad():  # move own parameters off their zero initialisation (biases, LoRA factors)
        for p in module.head.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return module


def batch(ignore: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, V, (B, T + 1), generator=g)
    targets = idx[:, 1:].clone()
    if ignore:
        targets[0, :4] = IGNORE_INDEX  # a padded prefix
        targets[2, -1] = IGNORE_INDEX
    return idx[:, :-1], targets


def assert_rel_close(
    actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-5, what: str = ""
) -> None:
    """Within ``rtol`` relative to the tensor's scale (elementwise relative error is meaningless near 0)."""
    scale = expected.abs().max().clamp_min(1e-30)
    error = ((actual - expected).abs().max() / scale).item()
    assert error <= rtol, f"{what}: relative error {error:.2e} > {rtol:.0e}"


def loss_and_grads(module: LMHeadModule, idx, targets):
    module.zero_grad()
    out = module.train_loss(idx, targets)
    (2.5 * out.loss).backward()  # an upstream gradient other than 1
    return out, {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("chunk", [7, 16, 1000])
@pytest.mark.parametrize("options", list(OPTIONS))
@pytest.mark.parametrize("name", LINEAR)
def test_chunked_matches_naive_for_every_head(name, options, chunk):
    """Loss and the gradients of every parameter (head, shared embedding, backbone) within 1e-5 in fp32."""
    idx, targets = batch()
    ref, ref_grads = loss_and_grads(model(head_class(name)(**OPTIONS[options]), "naive"), idx, targets)
    out, grads = loss_and_grads(model(head_class(name)(**OPTIONS[options]), "chunked", chunk), idx, targets)
    assert_rel_close(out.loss, ref.loss)
    assert_rel_close(out.nll, ref.nll)
    assert_rel_close(out.z_loss, ref.z_loss)
    assert grads.keys() == ref_grads.keys()
    for n in grads:
        assert_rel_close(grads[n], ref_grads[n], what=n)


@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_form_gradients_for_h_w_b_match(chunk):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(45, 8, generator=g, requires_grad=True)
    w = torch.randn(33, 8, generator=g, requires_grad=True)
    b = torch.randn(33, generator=g, requires_grad=True)
    targets = torch.randint(0, 33, (45,), generator=g)
    targets[::4] = IGNORE_INDEX
    for softcap in (None, 1.5):
        form = LinearForm(h, w, b, softcap)
        ref = reduce_token_loss(naive_linear_cross_entropy(form, targets), targets, z_loss=1e-2)
        out = chunked_train_loss(form, targets, z_loss=1e-2, chunk_size=chunk)
        for a, e in zip(
            torch.autograd.grad(out.loss, (h, w, b)), torch.autograd.grad(ref.loss, (h, w, b)), strict=True
        ):
            assert_rel_close(a, e)
        # Evaluation: per-token NLL and log-partition without gradients.
        with torch.no_grad():
            tokens = chunked_token_loss(form, targets, chunk_size=chunk)
            expected = naive_linear_cross_entropy(form, targets)
        assert_rel_close(tokens.nll, expected.nll)
        assert_rel_close(tokens.lse, expected.lse)
        assert (tokens.nll[targets == IGNORE_INDEX] == 0).all()


def test_gradients_only_for_inputs_that_need_them():
    h = torch.randn(10, 4, requires_grad=True)
    w = torch.randn(7, 4)  # frozen
    targets = torch.randint(0, 7, (10,))
    out = chunked_train_loss(LinearForm(h, w, None), targets, chunk_size=3)
    (grad,) = torch.autograd.grad(out.loss, (h,))
    assert grad.shape == h.shape and w.grad is None


def test_all_tokens_ignored_gives_zero_loss_and_gradient():
    h = torch.randn(6, 4, requires_grad=True)
    w = torch.randn(9, 4, requires_grad=True)
    targets = torch.full((6,), IGNORE_INDEX)
    out = chunked_train_loss(LinearForm(h, w, None), targets, chunk_size=4)
    out.loss.backward()
    assert out.loss.item() == 0 and not h.grad.any() and not w.grad.any()


@pytest.mark.parametrize(("dtype", "scale"), [(torch.bfloat16, 1.0), (torch.float16, 2.0**16)])
def test_mixed_precision_matches_naive_under_autocast(dtype, scale):
    """bf16 or fp16 products, fp32 sums; gradients come back in the parameters' dtype. fp16 runs under a
    GradScaler-sized loss scale (what 16-mixed does): nothing overflows, the unscaled gradients agree."""
    idx, targets = batch()
    results = []
    for backend in ("naive", "chunked"):
        module = model(TiedBiasHead(softcap=5.0), backend, 8)
        with torch.autocast("cpu", dtype=dtype):
            out = module.train_loss(idx, targets)
        (scale * out.loss).backward()
        grads = {n: p.grad / scale for n, p in module.named_parameters() if p.grad is not None}
        assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads.values())
        results.append((out, grads))
    (ref, ref_grads), (out, grads) = results
    assert_rel_close(out.loss, ref.loss, rtol=1e-2)
    for n in grads:
        assert_rel_close(grads[n], ref_grads[n], rtol=5e-2, what=n)


def test_evaluation_never_holds_the_full_logits(monkeypatch):
    """Validation NLL (and so the frequency buckets) comes from chunks of at most C x V logits."""
    shapes = []
    linear = F.linear

    def recording_linear(x, weight, bias=None):
        out = linear(x, weight, bias)
        if out.size(-1) == V:
            shapes.append(tuple(out.shape))
        return out

    monkeypatch.setattr(F, "linear", recording_linear)  # what every loss path calls
    idx, targets = batch()
    reference = model(UntiedHead(bias=True), "naive")
    chunked = model(UntiedHead(bias=True), "chunked", 8)
    with torch.no_grad():
        expected = reference.token_loss(idx, targets)
        shapes.clear()
        got = chunked.token_loss(idx, targets)
    assert shapes and max(s[0] for s in shapes) <= 8
    assert_rel_close(got.nll, expected.nll)
    shapes.clear()
    chunked.train_loss(idx, targets).loss.backward()
    assert shapes and max(s[0] for s in shapes) <= 8


def test_non_linear_head_falls_back_to_full_logits_with_one_warning():
    idx, targets = batch()
    reference = model(MixtureOfSoftmaxesHead(components=3), "naive")
    with pytest.warns(UserWarning, match="'mos' is not a linear form, so loss backend 'chunked'") as record:
        fused = model(MixtureOfSoftmaxesHead(components=3), "chunked")
        out, grads = loss_and_grads(fused, idx, targets)
        loss_and_grads(fused, idx, targets)
    assert len([w for w in record if "not a linear form" in str(w.message)]) == 1  # once, when built
    assert not isinstance(fused.head, LinearHead) and isinstance(TiedHead(), LinearHead)
    ref, ref_grads = loss_and_grads(reference, idx, targets)
    assert_rel_close(out.loss, ref.loss)
    for n in grads:
        assert_rel_close(grads[n], ref_grads[n], what=n)
    # A mixture of softmaxes returns log-probabilities.
    torch.testing.assert_close(fused(idx).logsumexp(-1), torch.zeros(B, T), atol=1e-5, rtol=0)


def test_auto_picks_chunked_and_chunk_size_follows_the_vocabulary():
    assert get_backend("auto").name == "chunked"
    assert chunk_tokens(50304) % 64 == 0 and chunk_tokens(50304) * 50304 * 8 <= 256 * 2**20
    assert chunk_tokens(10**9) == 64
    # Training's default fills 256 MiB with what its step holds: 2 bytes a logit compiled in bf16 (CUDA's
    # default), 8 uncompiled in fp32 (a CPU's).
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert ChunkGrad().chunk_tokens(50304, torch.bfloat16, cuda, softcap=False) == 2624
    assert ChunkGrad().chunk_tokens(128256, torch.bfloat16, cuda, softcap=False) == 1024
    assert ChunkGrad().chunk_tokens(50304, torch.float32, cpu, softcap=False) == chunk_tokens(50304) == 640
    assert ChunkGrad(compile=False).chunk_tokens(50304, torch.bfloat16, cuda, softcap=True) == 256


def _peak_bytes(fn, trace) -> int:
    """The most memory allocated on the CPU while ``fn`` runs, above what was allocated before."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    prof.export_chrome_trace(str(trace))
    events = json.loads(trace.read_text())["traceEvents"]
    memory = [e["args"] for e in events if e.get("name") == "[memory]"]
    before = memory[0]["Total Allocated"] - memory[0]["Bytes"]
    return max(m["Total Allocated"] for m in memory) - before


@pytest.mark.parametrize("softcap", [None, 2.0])
@pytest.mark.parametrize(
    ("dtype", "compiled"),
    [(torch.float32, False), (torch.bfloat16, False), (torch.float64, False), (torch.float32, True)],
)
def test_the_chunked_loss_holds_one_chunk_at_a_time(dtype, compiled, softcap, tmp_path):
    """Peak memory of forward and backward, beyond the gradients of h and W: one chunk's step, as
    ChunkGrad.bytes_per_logit counts it and the default chunk size assumes. The gradient is written over
    the logits and each chunk's buffer is freed before the next is formed; holding the next chunk's
    logits beside the last one's (three buffers, as before) fails this. (The compiled step in bf16 is
    measured on CUDA: on a CPU the bf16 matrix product adds a scratch copy of its operand.)"""
    n, k, v, c = 256, 16, 4096, 64
    g = torch.Generator().manual_seed(0)
    h = torch.randn(n, k, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(v, k, generator=g) * 0.1).to(dtype).requires_grad_()
    targets = torch.randint(0, v, (n,), generator=g)
    chunk_grad = ChunkGrad(compile=compiled)

    def step():
        out = chunked_train_loss(
            LinearForm(h, w, None, softcap), targets, chunk_size=c, chunk_grad=chunk_grad
        )
        out.loss.backward()

    step()  # compiled: the compilation, outside the measurement
    h.grad = w.grad = None
    floor = (n + v) * k * dtype.itemsize  # the gradients of h and W
    held = _peak_bytes(step, tmp_path / "trace.json") - floor
    bound = chunk_grad.bytes_per_logit(dtype, torch.device("cpu"), softcap is not None)
    assert held <= bound * c * v + 16 * 1024, f"{held / (c * v):.2f} bytes a logit, counted {bound}"


@pytest.mark.parametrize(("name", "package"), [("liger", "liger-kernel"), ("cce", "cut-cross-entropy")])
def test_optional_backends_say_what_is_missing(name, package, monkeypatch):
    """The package on a GPU; on a CPU that it needs a GPU, installed or not."""
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n.replace("_", "-") == package else real(n, *a)
    )
    with pytest.raises(
        ConfigError, match=rf"loss backend '{name}' needs the {package} package.*pip install {package}"
    ):
        get_backend(name).check(torch.device("cuda"))
    with pytest.raises(
        ConfigError, match=rf"loss backend '{name}' runs on CUDA GPUs only and this run is on cpu"
    ):
        get_backend(name).check(torch.device("cpu"))


def test_cce_refuses_forms_it_cannot_compute():
    backend = loss_module.BACKENDS["cce"]()
    form = LinearForm(torch.zeros(1, 4), torch.zeros(5, 4), torch.zeros(5))
    with pytest.raises(ConfigError, match=r"'cce' does not support an output bias; use .*chunked or liger"):
        backend.check_form(form, 0.0)
    with pytest.raises(ConfigError, match="'cce' does not support a z-loss"):
        backend.check_form(form._replace(bias=None), 1e-4)


def test_cce_refuses_fp32_with_what_to_set():
    """Its backward asserts bf16/fp16 inputs: say so before the kernel does."""
    backend = loss_module.BACKENDS["cce"]()
    form = LinearForm(torch.zeros(1, 4), torch.zeros(5, 4), None)
    with pytest.raises(ConfigError, match=r"'cce' computes in bf16 or fp16 only .*precision=bf16-mixed"):
        backend.check_form(form, 0.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        backend.check_form(form, 0.0)  # the dtype it will compute in is fine


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["chunked", "liger", "cce"])
def test_fused_gradients_are_exact_at_a_gpt2_vocabulary(backend):
    """At V=50304 every softmax value is near 1/V, below cce's default gradient filter: the filter would
    drop most of W's gradient. Each backend's gradients match the fp32 reference to bf16 accuracy."""
    if not _cuda_backend(backend):
        pytest.skip(f"needs CUDA and the {backend} backend")
    g = torch.Generator(device="cuda").manual_seed(0)
    n, d, v = 2048, 64, 50304
    h = (torch.randn(n, d, device="cuda", generator=g) * 0.1).bfloat16().requires_grad_()
    w = (torch.randn(v, d, device="cuda", generator=g) * 0.02).bfloat16().requires_grad_()
    targets = torch.randint(0, v, (n,), device="cuda", generator=g)
    reference = F.cross_entropy(F.linear(h.float(), w.float()), targets)
    ref_h, ref_w = torch.autograd.grad(reference, (h, w))
    loss = get_backend(backend).train_loss(LinearForm(h, w, None), targets, -100, 0.0).loss
    grad_h, grad_w = torch.autograd.grad(loss, (h, w))
    for grad, ref in ((grad_h, ref_h), (grad_w, ref_w)):
        assert (grad.float() - ref.float()).norm() / ref.float().norm() < 2e-2


def _cuda_backend(name: str) -> bool:
    package = {"liger": "liger_kernel", "cce": "cut_cross_entropy"}.get(name)
    return torch.cuda.is_available() and (package is None or importlib.util.find_spec(package) is not None)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["chunked", "liger", "cce"])
@pytest.mark.parametrize("name", ["tied", "untied", "tied_bias"])
def test_fused_backends_on_gpu_match_naive_in_bf16(name, backend):
    if not _cuda_backend(backend):
        pytest.skip(f"needs CUDA and the {backend} backend")
    if backend == "cce" and name == "tied_bias":
        pytest.skip("cce has no bias")
    idx, targets = (t.cuda() for t in batch())
    results = []
    for b in ("naive", backend):
        module = model(head_class(name)(softcap=30.0), b).cuda()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            results.append(loss_and_grads(module, idx, targets))
    (ref, ref_grads), (out, grads) = results
    assert_rel_close(out.loss, ref.loss, rtol=1e-2)
    for n in grads:
        assert_rel_close(grads[n], ref_grads[n], rtol=5e-2, what=n)


def test_compiled_chunk_gradient_matches_eager():
    """The per-chunk gradient that CUDA runs compiled, compiled here with inductor on CPU."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(40, 8, generator=g, requires_grad=True)
    w = torch.randn(33, 8, generator=g, requires_grad=True)
    targets = torch.randint(0, 33, (40,), generator=g)
    targets[:3] = IGNORE_INDEX
    form = LinearForm(h, w, None, 2.0)
    eager = chunked_train_loss(form, targets, z_loss=1e-3, chunk_size=16, chunk_grad=ChunkGrad(False))
    compiled = chunked_train_loss(form, targets, z_loss=1e-3, chunk_size=16, chunk_grad=ChunkGrad(True))
    assert_rel_close(compiled.loss, eager.loss)
    for a, e in zip(
        torch.autograd.grad(compiled.loss, (h, w)), torch.autograd.grad(eager.loss, (h, w)), strict=True
    ):
        assert_rel_close(a, e)


def test_a_failing_compiler_falls_back_to_eager_once():
    def broken(*args):
        raise RuntimeError("no compiler here")

    chunk_grad = ChunkGrad(compile=True)
    chunk_grad._compiled = broken
    h, w = torch.randn(20, 4, requires_grad=True), torch.randn(9, 4)
    targets = torch.randint(0, 9, (20,))
    with pytest.warns(UserWarning, match="compiling the chunked loss failed .*no compiler here.*uncompiled"):
        out = chunked_train_loss(LinearForm(h, w, None), targets, chunk_size=8, chunk_grad=chunk_grad)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once: later calls run uncompiled without a word
        chunked_train_loss(LinearForm(h, w, None), targets, chunk_size=8, chunk_grad=chunk_grad)
    expected = chunked_train_loss(LinearForm(h, w, None), targets, chunk_size=8, chunk_grad=ChunkGrad(False))
    assert out.loss.item() == expected.loss.item()


@pytest.mark.parametrize("softcap", [None, 2.0])
def test_one_hot_by_comparison_equals_the_scatter(softcap):
    """The compiled chunk step subtracts the one-hot as a comparison (fusible); eager scatters it."""
    from lmheads.loss.chunked import _chunk_grad

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(12, 33, generator=g)
    targets = torch.randint(0, 33, (12,), generator=g)
    targets[[0, 5]] = IGNORE_INDEX
    valid = targets != IGNORE_INDEX
    scatter = _chunk_grad(logits.clone(), targets, valid, softcap, 1e-2, onehot_by_compare=False)
    compare = _chunk_grad(logits.clone(), targets, valid, softcap, 1e-2, onehot_by_compare=True)
    for a, b in zip(scatter, compare, strict=True):
        assert torch.equal(a, b)
    if softcap is None:  # a row sums to (1 + 2 z lse) - 1: the one-hot took its 1 from each counted row
        lse = scatter[1][valid]
        torch.testing.assert_close(scatter[2][valid].sum(1), 2e-2 * lse, atol=1e-5, rtol=1e-4)
    assert not scatter[2][~valid].any()  # ignored tokens add nothing


def test_fp32_out_gemm_falls_back_to_product_and_sum_once_where_missing():
    """CPU has no GEMM with fp32 output from bf16 operands: asked for one, it warns once and adds."""
    chunk_grad = ChunkGrad(compile=False, fp32_out_gemm=True)
    g = torch.Generator().manual_seed(0)
    acc = torch.randn(9, 4, generator=g)
    a, b = torch.randn(9, 6, generator=g).bfloat16(), torch.randn(6, 4, generator=g).bfloat16()
    expected = acc + (a @ b).float()
    ptr = acc.data_ptr()
    with pytest.warns(UserWarning, match="GEMM with fp32 output is not available here"):
        chunk_grad.add_product(acc, a, b)
    assert torch.equal(acc, expected) and acc.data_ptr() == ptr
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        chunk_grad.add_product(acc, a, b)
    assert torch.equal(acc, expected + (a @ b).float())


def test_chunk_grad_rejects_an_unknown_one_hot():
    with pytest.raises(ValueError, match="onehot must be 'scatter', 'compare' or None"):
        ChunkGrad(onehot="gather")


@pytest.mark.gpu
@pytest.mark.parametrize("fp32_out_gemm", [True, False])
def test_chunked_w_gradient_in_fp32_under_autocast_on_gpu(fp32_out_gemm):
    """bf16-mixed training: fp32 W, bf16 products, W's gradient summed over 8 chunks in fp32, by one GEMM
    with fp32 output into the accumulator or by a product then a sum; both match the fp32 reference."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    g = torch.Generator(device="cuda").manual_seed(0)
    n, d, v = 2048, 64, 50304
    h = (torch.randn(n, d, device="cuda", generator=g) * 0.1).requires_grad_()
    w = (torch.randn(v, d, device="cuda", generator=g) * 0.02).requires_grad_()
    targets = torch.randint(0, v, (n,), device="cuda", generator=g)
    ref_h, ref_w = torch.autograd.grad(F.cross_entropy(F.linear(h, w), targets), (h, w))
    chunk_grad = ChunkGrad(fp32_out_gemm=fp32_out_gemm)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the GEMM with fp32 output exists on CUDA: no fallback
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = chunked_train_loss(LinearForm(h, w, None), targets, chunk_size=256, chunk_grad=chunk_grad)
        grad_h, grad_w = torch.autograd.grad(loss.loss, (h, w))
    assert grad_w.dtype == torch.float32
    for grad, ref in ((grad_h, ref_h), (grad_w, ref_w)):
        assert (grad - ref).norm() / ref.norm() < 1e-2


@pytest.mark.gpu
def test_the_compiled_chunk_step_holds_only_its_logits_on_gpu():
    """CUDA's default step, compiled, in bf16: beyond the gradients of h and W, one chunk's logits
    (2 bytes a logit), which the gradient's kernel overwrites. Three buffers (6 bytes) before."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    n, k, v, c = 4096, 768, 50304, 1024
    g = torch.Generator(device="cuda").manual_seed(0)
    h = (torch.randn(n, k, device="cuda", generator=g) * 0.5).bfloat16().requires_grad_()
    w = (torch.randn(v, k, device="cuda", generator=g) * 0.02).bfloat16().requires_grad_()
    targets = torch.randint(0, v, (n,), device="cuda", generator=g)
    chunk_grad = ChunkGrad()
    assert chunk_grad.bytes_per_logit(torch.bfloat16, h.device, softcap=False) == 2

    def step():
        chunked_train_loss(
            LinearForm(h, w, None), targets, chunk_size=c, chunk_grad=chunk_grad
        ).loss.backward()

    step()  # compiles
    h.grad = w.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    held = torch.cuda.max_memory_allocated() - before - (n + v) * k * 2
    assert held <= 2 * c * v + 8 * 2**20, f"{held / (c * v):.2f} bytes a logit"
