"""How far bf16 autocast moves the gradient from fp32, per impl item (issue 18): CPU, tiny preset, eager,
residual=ddl dv=1, one 16 x 128 batch of random byte tokens, seed 0; impl=paper with one field set as
impl=reference sets it.    python results/ddp/bf16_sensitivity.py"""
# CPU, tiny preset, eager: bf16-autocast vs fp32 gradient distance, impl=paper with one item switched to reference
import sys, torch
sys.path.insert(0, "src")
from deepdelta.model import DeltaTransformer, ModelConfig
from deepdelta.model.config import IMPLS
def grads(cfg, bf16):
    torch.manual_seed(0); m = DeltaTransformer(cfg)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, cfg.vocab_size, (16, cfg.block_size), generator=g); y = torch.randint(0, cfg.vocab_size, (16, cfg.block_size), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = m.loss(x, y)
    loss.backward()
    return {n: p.grad.double() for n, p in m.named_parameters()}
def rel(a, b):
    return (sum(float((a[k]-b[k]).norm()**2) for k in b) / sum(float(b[k].norm()**2) for k in b)) ** .5
base = dict(residual="ddl", dv=1, impl="paper")
for item in [None] + list(IMPLS["reference"]):
    if item == "impl": continue
    kw = dict(base) if item is None else {**base, item: IMPLS["reference"][item]}
    try:
        cfg = ModelConfig.preset("tiny", **kw)
    except Exception as e:
        print(item, "invalid", e); continue
    print(f"impl=paper{'' if item is None else ' + ' + item + '=' + str(IMPLS['reference'][item])}: bf16 vs fp32 {rel(grads(cfg, True), grads(cfg, False)):.3f}", flush=True)
kw = dict(residual="ddl", dv=1, impl="reference"); cfg = ModelConfig.preset("tiny", **kw)
print(f"impl=reference: bf16 vs fp32 {rel(grads(cfg, True), grads(cfg, False)):.3f}", flush=True)
