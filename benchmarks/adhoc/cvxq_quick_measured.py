import json, sys, torch
WIDTHS = sys.argv[1] if len(sys.argv) > 1 else '2,3,4,8'  # 2,3,4 gave the *_234 numbers
sys.argv = ['x', '2']
exec(open('benchmarks/adhoc/cvxq_quick_base.py').read().split("res = {}")[0])
mse = json.load(open('/tmp/unit_mse.json'))
lm = json.load(open('/tmp/alloc_exp.json'))['lm_grad_sq']
pca = [u['grad_sq'] for u in units]
W = [int(w) for w in WIDTHS.split(',')]
def greedy(gsq, target=3.546875):
    P = [u['params'] for u in units]
    total = sum(P)
    rate = lambda b: b + 0.5 + b / 64
    idx = [0] * len(units)
    used = sum(p * rate(W[0]) for p in P)
    budget = target * total
    while True:
        best, bi = None, None
        for i, p in enumerate(P):
            if idx[i] + 1 >= len(W): continue
            m = mse[i]['mse']
            gain = gsq[i] * p * (m[str(W[idx[i]])] - m[str(W[idx[i] + 1])])
            cost = p * (rate(W[idx[i] + 1]) - rate(W[idx[i]]))
            if used + cost > budget + 1e-6: continue
            if best is None or gain / cost > best: best, bi = gain / cost, i
        if bi is None: break
        used += P[bi] * (rate(W[idx[bi] + 1]) - rate(W[idx[bi]])); idx[bi] += 1
    return [W[i] for i in idx], used / total
res = {}
for name, g in ((f'pca_measured_{WIDTHS}', pca), (f'lm_measured_{WIDTHS}', lm)):
    bits, ach = greedy(g)
    print(name, ach, bits, flush=True)
    res[name] = ppl(quantized(bits)); print(res, flush=True)
