import json, sys, torch
sys.argv = ['x', '2']
exec(open('benchmarks/adhoc/cvxq_quick_base.py').read().split("res = {}")[0])
pca = [u['grad_sq'] for u in units]
lm = json.load(open('/tmp/alloc_exp.json'))['lm_grad_sq']
t = 3.0390625
res = {}
mix = [2 if int(u['name'].split('.')[2]) % 2 == 0 else 3 for u in units]
res['uniform_mix'] = ppl(quantized(mix)); print(res, flush=True)
a = allocate(make_units(pca), [2, 3, 4, 8], t, True); print('pca', a.achieved_bits, a.bits, flush=True)
res['cvxq_pca'] = ppl(quantized(a.bits)); print(res, flush=True)
a = allocate(make_units(lm), [2, 3, 4, 8], t, True); print('lm', a.achieved_bits, a.bits, flush=True)
res['cvxq_lm'] = ppl(quantized(a.bits)); print(res, flush=True)
