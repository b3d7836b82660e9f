import numpy as np, torch, collections, json
from linfusion.mini.bundle import load_mini_pipeline
from linfusion.mini.checker import AdherenceChecker
from linfusion.mini.world import prompt_set
from linfusion.mini.quality import generate
torch.set_num_threads(1)
pipe = load_mini_pipeline(); pipe.set_progress_bar_config(disable=True)
prompts = prompt_set("heldout", 48)
imgs = generate(pipe, prompts, size=128, steps=20, seed=0, batch=16)
ch = AdherenceChecker()
fails = collections.Counter(); tot = collections.Counter(); passed = 0; extra = 0
for r, p in zip(imgs, prompts):
    s = ch.score(r, p); passed += s["passed"]
    for k, v in s["attributes"].items():
        key = k.split(".")[-1] if "." in k else k.rstrip("0123456789")
        tot[key] += 1; fails[key] += (not v)
print("teacher strict", passed / len(prompts))
print(json.dumps({k: round(fails[k] / tot[k], 2) for k in tot}))
