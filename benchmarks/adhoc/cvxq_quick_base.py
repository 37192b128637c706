"""Quick in-process comparison of allocations on P1: RTN g64 at the allocated widths, PPL on
the first 32 test windows. Sensitivity: PCA (from the pipeline's report) and LM-loss Fisher on
N calibration windows."""
import copy, json, math, sys, time, torch
from transformers import AutoModelForCausalLM
from jobs.recipes import load_recipe
from pipeline.assets import resolve_model_path
from pipeline.calibration import calibration_windows_for, eval_windows_for
from pipeline.cvxq.allocation import Unit, allocate
from pipeline.formats import AffineFormat
from pipeline.methods.rtn import rtn_quantize
torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
base = load_recipe("p1-cvxq-rtn-3bit", {"eval.max_windows": 32})
path = resolve_model_path(base.model.path)
model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
rep = json.load(open('/tmp/cvxq_rtn3_report.json'))
units = rep['allocation']['units']
calib = calibration_windows_for(path, base.calibration)
test = eval_windows_for(path, base.eval)
params = dict(model.named_parameters())

def ppl(m):
    nll, n = 0.0, 0
    with torch.no_grad():
        for i in range(0, test.shape[0], 4):
            ids = test[i:i+4]
            logits = m(input_ids=ids).logits
            nll += torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction='sum').item()
            n += ids[:, 1:].numel()
    return math.exp(nll / n)

def quantized(bits):
    m = copy.deepcopy(model)
    p = dict(m.named_parameters())
    with torch.no_grad():
        for u, b in zip(units, bits):
            for n in u['linears']:
                w = p[n + '.weight']
                w.copy_(rtn_quantize(w, AffineFormat(b, 64))[0])
    return m

def fisher(nwin):
    t = time.time()
    for p in model.parameters(): p.requires_grad_(False)
    lin = [n for u in units for n in u['linears']]
    for n in lin: params[n + '.weight'].requires_grad_(True)
    sq = {n: 0.0 for n in lin}
    for i in range(nwin):
        ids = calib[i:i+1]
        logits = model(input_ids=ids).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction='sum')
        grads = torch.autograd.grad(loss, [params[n + '.weight'] for n in lin])
        for n, g in zip(lin, grads): sq[n] += g.double().pow(2).sum().item()
    for n in lin: params[n + '.weight'].requires_grad_(False)
    print('fisher', nwin, 'windows', round(time.time() - t), 's', flush=True)
    return [sum(sq[n] for n in u['linears']) / (u['params'] * nwin) for u in units]

def make_units(gsq, mse=None):
    return [Unit(u['name'], u['params'], g, u['weight_var'], 0.5, 1 / 64) for u, g in zip(units, gsq)]

res = {}
target = 3.546875
res['uniform3'] = ppl(quantized([3] * len(units))); print(res, flush=True)
res['pca_report'] = ppl(quantized([u['bits'] for u in units])); print(res, flush=True)
g = fisher(int(sys.argv[2]) if len(sys.argv) > 2 else 32)
a = allocate(make_units(g), [2, 3, 4, 8], target, True)
print('lm widths', a.bits, a.achieved_bits, flush=True)
res['lm_loss'] = ppl(quantized(a.bits)); print(res, flush=True)
a2 = allocate(make_units(g), [3, 4, 8], target, True)
print('lm widths 3/4/8', a2.bits, flush=True)
json.dump({'res': res, 'lm_grad_sq': g, 'lm_bits': a.bits}, open('/tmp/alloc_exp.json', 'w'))
