"""Allocation over (bits, group size) per unit with each option's measured RTN error and the
side information in the cost: RTN at the allocated formats, PPL on the first 32 test windows.
argv: threads, option bit widths (e.g. 3,4), sensitivity (pca|lm)."""
import json, sys, torch
BITS = [int(b) for b in (sys.argv[2] if len(sys.argv) > 2 else '3,4').split(',')]
SENS = sys.argv[3] if len(sys.argv) > 3 else 'lm'
sys.argv = ['x', sys.argv[1] if len(sys.argv) > 1 else '1']
exec(open('benchmarks/adhoc/cvxq_quick_base.py').read().split("res = {}")[0])
GROUPS = [32, 64, 96, 192, None]
TARGET = 3.546875
grads = json.load(open('/tmp/alloc_exp.json'))['lm_grad_sq'] if SENS == 'lm' else [u['grad_sq'] for u in units]
opts = [(b, g) for b in BITS for g in GROUPS]
D, C = [], []  # per unit: measured mse per option, cost per weight per option
for u in units:
    ws = [params[n + '.weight'].detach() for n in u['linears']]
    d, c = [], []
    for b, g in opts:
        err = sum(((rtn_quantize(w, AffineFormat(b, g))[0] - w) ** 2).sum().item() for w in ws)
        d.append(err / u['params'])
        c.append(b + (32 + b) / (g or ws[0].shape[1]))
    D.append(d); C.append(c)
D = torch.tensor(D, dtype=torch.float64) * torch.tensor(grads, dtype=torch.float64)[:, None]
C = torch.tensor(C, dtype=torch.float64)
P = torch.tensor([u['params'] for u in units], dtype=torch.float64)
budget = TARGET * P.sum()
def pick(lam):
    return torch.argmin(D + lam * C, dim=1)
def used(idx):
    return float((P * C[torch.arange(len(units)), idx]).sum())
lo, hi = 1e-20, 1e5
for _ in range(200):
    mid = (lo * hi) ** 0.5
    if used(pick(mid)) <= budget: hi = mid
    else: lo = mid
idx = pick(hi)
# greedy fill: best distortion drop per extra bit among options that still fit
while True:
    cur = used(idx); best = None
    r = torch.arange(len(units))
    for j in range(len(opts)):
        extra = P * (C[:, j] - C[r, idx]); gain = P * (D[r, idx] - D[:, j])
        ok = (extra > 0) & (gain > 0) & (cur + extra <= budget + 1e-6)
        ratio = torch.where(ok, gain / extra.clamp(min=1e-12), torch.full_like(gain, -1.0))
        i = int(torch.argmax(ratio))
        if ratio[i] > 0 and (best is None or ratio[i] > best[0]): best = (float(ratio[i]), i, j)
    if best is None: break
    idx[best[1]] = best[2]
ach = used(idx) / float(P.sum())
chosen = [opts[int(i)] for i in idx]
from collections import Counter
print('achieved', ach, Counter(chosen), flush=True)
m = copy.deepcopy(model); p = dict(m.named_parameters())
with torch.no_grad():
    for u, (b, g) in zip(units, chosen):
        for n in u['linears']:
            w = p[n + '.weight']; w.copy_(rtn_quantize(w, AffineFormat(b, g))[0])
res = {f'groups_{SENS}_{",".join(map(str, BITS))}': ppl(m), 'achieved': ach}
print(res, flush=True)
json.dump({'res': res, 'chosen': chosen}, open(f'/tmp/groups_{SENS}_{"".join(map(str, BITS))}.json', 'w'))
