"""GPTQ's memory-lean solve: the same result as the textbook formulation, float32 Hessians for
inputs too wide for float64, and the caller's (shared) Hessian never written."""
import pytest
import torch

from pipeline.formats import AffineFormat
from pipeline.methods import gptq
from pipeline.methods.gptq import gptq_quantize, sweep_dtype


@pytest.mark.unit
def test_hessian_dtype_by_width():
    assert sweep_dtype("cpu", 1536) == torch.float64  # every P1 input
    assert sweep_dtype("cpu", 8192) == torch.float64  # 0.5 GB
    assert sweep_dtype("cpu", 28672) == torch.float32  # Llama-70B down_proj: 6.6 GB in float64
    assert sweep_dtype("meta", 64) == torch.float32  # accelerators: float32 always
    assert gptq.Hessian(28672, "meta").dtype == torch.float32


@pytest.mark.unit
@pytest.mark.parametrize("act_order", [False, True])
def test_lean_solve_equals_the_textbook_one_and_leaves_the_hessian(act_order):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 96, generator=g, dtype=torch.float64)
    x[:, 5] = 0  # a dead input column
    h = 2 / 256 * x.T @ x
    w = torch.randn(40, 96, generator=g)
    kept = h.clone()
    fmt = AffineFormat(3, 32, False)
    got = gptq_quantize(w, h, fmt, act_order=act_order)
    assert torch.equal(h, kept)  # shared among q/k/v: must not change
    # the textbook factor: chol(inv(H + damp * mean(diag) * I)), upper
    fixed = kept.clone()
    fixed[5, 5] = 1.0
    damped = fixed + 0.01 * fixed.diagonal().mean() * torch.eye(96, dtype=torch.float64)
    expected = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(damped)),
                                     upper=True)
    upper, _ = gptq._inverse_factor(fixed, 0.01)
    assert torch.equal(upper, expected)
    assert torch.equal(got.weight[:, 5], torch.zeros(40))  # the dead column is zeroed


@pytest.mark.unit
@pytest.mark.parametrize("columns", [100, 512, 600, 1100])
def test_gram_from_the_upper_blocks_is_x_transpose_x(columns):
    g = torch.Generator().manual_seed(columns)
    x = torch.randn(64, columns, generator=g)
    got = gptq.gram(x, block=512)
    exact = x.double().T @ x.double()
    assert torch.equal(got, got.T)  # mirrored, exactly symmetric
    assert torch.allclose(got.double(), exact, rtol=1e-5, atol=1e-4)


@pytest.mark.unit
def test_hessian_sums_one_float32_product_per_window_in_float64():
    """The same windows in one chunk or in two (as two workers or chunk sizes would split
    them) give the same per-window products; the float64 sum is within rounding of the exact
    one."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 32, 700, generator=g)
    whole, split = gptq.Hessian(700), gptq.Hessian(700)
    whole.add(x)
    split.add(x[:2])
    split.add(x[2:])
    assert whole.dtype == torch.float64 and whole.count == 6 * 32
    assert torch.allclose(whole.value(), split.value(), rtol=1e-15, atol=1e-15)
    rows = x.reshape(-1, 700).double()
    exact = 2 / rows.shape[0] * rows.T @ rows
    assert torch.allclose(whole.value(), exact, rtol=1e-5, atol=1e-5)


@pytest.mark.unit
@pytest.mark.parametrize("columns,by", [(1536, "window"), (1536, "column block"),
                                        (576, "window"), (576, "column block")])
def test_hessian_bits_do_not_depend_on_the_thread_count(monkeypatch, columns, by):
    """float32 GEMMs round differently with the thread count; the Hessian must not (a worker
    of 1 thread and one of 2 or 3 produce the same codes). With several threads the products
    run a window per thread, or a column block per thread where a window's products would
    not fit WINDOW_PRODUCTS_BYTES."""
    if by == "column block":
        monkeypatch.setattr(gptq, "WINDOW_PRODUCTS_BYTES", 0)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 512, columns, generator=g)
    threads = torch.get_num_threads()
    got = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            h = gptq.Hessian(columns)
            h.add(x)
            got.append(h.matrix)
            assert torch.get_num_threads() == n
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(got[0], got[1]) and torch.equal(got[0], got[2])
