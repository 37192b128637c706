"""GPTQ's memory-lean solve: the factor from one Cholesky of the reversed Hessian and one
blocked triangular inversion equals the textbook chol(inv(H)); float32 for inputs too wide for
float64; the caller's (shared) Hessian never written; one factor shared by the linears that
read one input."""
import pytest
import torch

from pipeline.formats import AffineFormat
from pipeline.methods import gptq
from pipeline.methods.gptq import gptq_quantize, hessian_dtype, inverse_factor, solve_dtype


@pytest.mark.unit
def test_dtypes_by_width():
    assert hessian_dtype("cpu", 1536) == torch.float64  # every P1 input
    assert hessian_dtype("cpu", 8192) == torch.float64  # 0.5 GB of sums
    assert hessian_dtype("cpu", 28672) == torch.float32  # Llama-70B down_proj: 6.6 GB in float64
    assert hessian_dtype("meta", 64) == torch.float32  # accelerators: float32 always
    assert gptq.Hessian(28672, "meta").dtype == torch.float32
    assert solve_dtype("cpu", 1536) == torch.float64
    assert solve_dtype("cpu", 4096) == torch.float64  # a 7B model's attention inputs
    assert solve_dtype("cpu", 8192) == torch.float32  # a 70B model's: solved as on a GPU
    assert solve_dtype("meta", 64) == torch.float32


def _textbook_upper(h: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """chol(inv(H + damp * mean(diag) * I)), upper, as the GPTQ paper writes it."""
    damped = h + damp * h.diagonal().mean() * torch.eye(h.shape[0], dtype=h.dtype)
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(damped)),
                                 upper=True)


@pytest.mark.unit
@pytest.mark.parametrize("n", [1, 7, 256, 257, 600, 1100])
def test_blocked_triangular_inverse_is_the_inverse(n):
    g = torch.Generator().manual_seed(n)
    a = torch.randn(n, 2 * n, generator=g, dtype=torch.float64)
    lower = torch.linalg.cholesky(a @ a.T / (2 * n) + 0.1 * torch.eye(n, dtype=torch.float64))
    expected = torch.linalg.solve_triangular(lower, torch.eye(n, dtype=torch.float64),
                                             upper=False)
    got = gptq._invert_lower_(lower.clone())
    assert torch.equal(got, got.tril())
    assert torch.allclose(got, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.unit
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("n", [96, 700])
def test_factor_equals_the_textbook_one_and_leaves_the_hessian(act_order, n):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(4 * n, n, generator=g, dtype=torch.float64) * torch.linspace(
        0.1, 3, n, dtype=torch.float64)
    x[:, 5] = 0  # a dead input column
    h = 2 / x.shape[0] * x.T @ x
    kept = h.clone()
    factor = inverse_factor(h, 0.01, act_order)
    assert torch.equal(h, kept)  # shared among q/k/v: must not change
    fixed = kept.clone()
    fixed[5, 5] = 1.0
    perm = torch.argsort(fixed.diagonal(), descending=True, stable=True) if act_order else None
    if perm is not None:
        fixed = fixed[perm.unsqueeze(1), perm]
        assert torch.equal(factor.perm, perm)
    upper = factor.upper()
    assert torch.equal(upper, upper.triu())
    assert torch.allclose(upper, _textbook_upper(fixed), rtol=1e-9, atol=1e-12)
    for i1, i2 in [(0, 32), (32, 64), (n - 10, n)]:  # the sweep's slices
        assert torch.equal(factor.rows(i1, i2), upper[i1:i2, i1:])
    assert bool(factor.dead[5]) and int(factor.dead.sum()) == 1


@pytest.mark.unit
@pytest.mark.parametrize("act_order", [False, True])
def test_lean_solve_equals_the_textbook_sweep(act_order):
    """The sweep written out with the textbook factor gives the same codes."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 96, generator=g, dtype=torch.float64)
    x[:, 5] = 0
    h = 2 / 256 * x.T @ x
    w = torch.randn(40, 96, generator=g)
    fmt = AffineFormat(3, 32, False)
    got = gptq_quantize(w, h, fmt, act_order=act_order, block_size=32)
    assert torch.equal(got.weight[:, 5], torch.zeros(40))  # the dead column is zeroed
    # the reference: one column at a time with the textbook factor, no lazy batches
    fixed = h.clone()
    fixed[5, 5] = 1.0
    ww = w.double().clone()
    ww[:, 5] = 0
    perm = (torch.argsort(fixed.diagonal(), descending=True, stable=True) if act_order
            else torch.arange(96))
    scale_zero = gptq.choose_qparams(ww.float(), fmt)
    ww, fixed = ww[:, perm], fixed[perm.unsqueeze(1), perm]
    u = _textbook_upper(fixed)
    codes = torch.zeros_like(ww)
    lazy = not act_order
    scale, zero = scale_zero.scale.double().clone(), scale_zero.zero_point.double().clone()
    one = AffineFormat(3, None, False)
    for c in range(96):
        grp = int(perm[c]) // 32
        if lazy and c % 32 == 0:
            p = gptq.choose_qparams(ww[:, c:c + 32].float(), one)
            scale[:, grp], zero[:, grp] = p.scale[:, 0].double(), p.zero_point[:, 0].double()
        q = (torch.round(ww[:, c] / scale[:, grp]) + zero[:, grp]).clamp(fmt.qmin, fmt.qmax)
        codes[:, c] = q
        err = (ww[:, c] - (q - zero[:, grp]) * scale[:, grp]) / u[c, c]
        ww[:, c:] -= err.unsqueeze(1) * u[c, c:].unsqueeze(0)
    codes = codes[:, torch.argsort(perm)].to(torch.int32)
    assert (got.codes != codes).float().mean() < 0.01  # rounding ties may fall either way


@pytest.mark.unit
def test_a_shared_factor_gives_what_each_linear_alone_gives():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(512, 128, generator=g, dtype=torch.float64)
    h = 2 / 512 * x.T @ x
    fmt = AffineFormat(4, 64, False)
    factor = inverse_factor(h, 0.01, True)
    for rows in (16, 48):
        w = torch.randn(rows, 128, generator=g)
        alone = gptq_quantize(w, h, fmt, act_order=True)
        shared = gptq_quantize(w, None, fmt, act_order=True, factor=factor)
        assert torch.equal(alone.codes, shared.codes) and torch.equal(alone.weight, shared.weight)


@pytest.mark.unit
def test_damping_is_raised_until_the_factorization_succeeds():
    h = torch.diag(torch.tensor([1.0, 1.0, -0.05, 1.0], dtype=torch.float64))
    factor = inverse_factor(h, 0.01)
    assert factor.damp == pytest.approx(0.1)  # 0.01 fails (-0.05 + 0.0074), 0.1 succeeds
    with pytest.raises(gptq.HessianError, match="not positive definite"):
        inverse_factor(-torch.eye(4, dtype=torch.float64), 0.01)


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
