import json, sys, torch
sys.argv = ['x', '2']
exec(open('benchmarks/adhoc/cvxq_quick_base.py').read().split("res = {}")[0])
from pipeline.formats import choose_qparams, quantize as qz, dequantize, QuantParams
def rtn_mse(w, b, g=64, grid=20):
    o, i = w.shape
    x = w.reshape(o, i // g, g)
    hi, lo = x.amax(-1).clamp(min=0), x.amin(-1).clamp(max=0)
    qmax = 2 ** b - 1
    best = None
    for k in range(grid):
        a = 1 - k / (2 * grid)  # 1.0 .. 0.525
        s = ((hi - lo) * a / qmax).clamp(min=1e-9)
        z = torch.round(-lo * a / s)
        q = (torch.round(x / s.unsqueeze(-1)) + z.unsqueeze(-1)).clamp(0, qmax)
        y = (q - z.unsqueeze(-1)) * s.unsqueeze(-1)
        e = (y - x).pow(2).sum(-1)
        if best is None:
            best, out = e, y
        else:
            m = e < best
            best = torch.where(m, e, best); out = torch.where(m.unsqueeze(-1), y, out)
    return out.reshape(o, i)
def quantized_mse(bits):
    m = copy.deepcopy(model); p = dict(m.named_parameters())
    with torch.no_grad():
        for u, b in zip(units, bits):
            for n in u['linears']:
                w = p[n + '.weight']; w.copy_(rtn_mse(w, b))
    return m
W = dict(model.named_parameters())
mse = []
for u in units:
    ws = [W[n + '.weight'].detach() for n in u['linears']]
    mse.append({b: sum((rtn_mse(w, b) - w).pow(2).sum().item() for w in ws) / u['params'] for b in (2, 3, 4, 8)})
lm = json.load(open('/tmp/alloc_exp.json'))['lm_grad_sq']
pca = [u['grad_sq'] for u in units]
WD = [2, 3, 4, 8]
def greedy(gsq, target=3.546875):
    P = [u['params'] for u in units]; total = sum(P)
    rate = lambda b: b + 0.5 + b / 64
    idx = [0] * len(units); used = sum(p * rate(2) for p in P); budget = target * total
    while True:
        best, bi = None, None
        for i, p in enumerate(P):
            if idx[i] + 1 >= 4: continue
            gain = gsq[i] * p * (mse[i][WD[idx[i]]] - mse[i][WD[idx[i] + 1]])
            cost = p * (rate(WD[idx[i] + 1]) - rate(WD[idx[i]]))
            if used + cost > budget + 1e-6: continue
            if best is None or gain / cost > best: best, bi = gain / cost, i
        if bi is None: break
        used += P[bi] * (rate(WD[idx[bi] + 1]) - rate(WD[idx[bi]])); idx[bi] += 1
    return [WD[i] for i in idx]
res = {'uniform3_mse': ppl(quantized_mse([3] * len(units)))}; print(res, flush=True)
for name, g in (('lm_mse', lm), ('pca_mse', pca)):
    bits = greedy(g); print(name, bits, flush=True)
    res[name] = ppl(quantized_mse(bits)); print(res, flush=True)
