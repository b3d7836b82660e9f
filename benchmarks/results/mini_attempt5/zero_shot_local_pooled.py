import json, sys, numpy as np, torch
from linfusion.mini.quality import load_pipeline, generate, apply_patch, _check, failure_rates, psnr
from linfusion.mini.world import prompt_set
torch.set_num_threads(2)
pipe = load_pipeline(None, "cpu")
prompts = prompt_set("heldout", 96, seed=0)
teacher = generate(pipe, prompts, size=128, steps=20, seed=0, batch=32)
for opts in [dict(window=4), dict(window=4, global_pool=4), dict(window=4, global_pool=2)]:
    apply_patch(pipe, "local", None, opts)
    imgs = generate(pipe, prompts, size=128, steps=20, seed=0, batch=32)
    checks = [_check(p) for p in zip(imgs, prompts)]
    row = {"opts": opts, "strict": float(np.mean([c[0] for c in checks])), "claims": float(np.mean([c[1] for c in checks])),
           "psnr": float(np.mean([psnr(a, b) for a, b in zip(imgs, teacher)])), "fail": failure_rates([c[2] for c in checks])}
    print(json.dumps(row), flush=True)
