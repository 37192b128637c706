import json, torch, glob
from safetensors.torch import load_file
from pipeline.formats import AffineFormat
from pipeline.methods.rtn import rtn_quantize
torch.set_num_threads(1)
rep = json.load(open('/tmp/cvxq_rtn3_report.json'))
units = rep['allocation']['units']
W = {}
for f in glob.glob('/root/.cache/relayquant/models/smollm2-135m/*.safetensors'):
    W.update(load_file(f))
rows = []
for u in units:
    ws = [W[n + '.weight'].float() for n in u['linears']]
    mse = {}
    for b in (2, 3, 4, 8):
        err = sum(((rtn_quantize(w, AffineFormat(b, 64))[0] - w) ** 2).sum().item() for w in ws)
        mse[b] = err / u['params']
    rows.append({'name': u['name'], 'bits': u['bits'], 'params': u['params'], 'grad_sq': u['grad_sq'], 'weight_var': u['weight_var'], 'mse': mse})
json.dump(rows, open('/tmp/unit_mse.json', 'w'))
for r in rows[:8] + rows[40:48]:
    m = r['mse']; v = r['weight_var']
    print(r['name'][-28:], r['bits'], ' '.join('%.2f' % (m[b] / (v * 2 ** (-2 * b))) for b in (2, 3, 4, 8)))
