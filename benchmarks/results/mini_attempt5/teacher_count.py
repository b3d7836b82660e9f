import numpy as np, torch, collections
from linfusion.mini.bundle import load_mini_pipeline
from linfusion.mini.checker import AdherenceChecker
from linfusion.mini.world import prompt_set, parse_prompt
from linfusion.mini.quality import generate
torch.set_num_threads(2)
pipe = load_mini_pipeline(); pipe.set_progress_bar_config(disable=True)
prompts = prompt_set("heldout", 48)
imgs = generate(pipe, prompts, size=128, steps=20, seed=0, batch=16)
np.save("/tmp/teacher48.npy", imgs)
ch = AdherenceChecker(); c = collections.Counter(); by_count = collections.Counter(); tot_count = collections.Counter()
n_objs = collections.Counter(); fail_objs = collections.Counter()
for r, p in zip(imgs, prompts):
    s = ch.score(r, p); scene = parse_prompt(p); comps = s["analysis"].components
    n_objs[len(scene.objects)] += 1; fail_objs[len(scene.objects)] += not s["passed"]
    for n, obj in enumerate(scene.objects):
        tot_count[obj.count] += 1
        if s["attributes"][f"obj{n}.count"]:
            continue
        by_count[obj.count] += 1
        same_colour = sum(1 for x in comps if x.colour == obj.colour)
        c[(obj.count, same_colour)] += 1
print("fails (asked, got blobs of colour):", sorted(c.items()))
print("count-fail rate by asked count:", {k: f"{by_count[k]}/{tot_count[k]}" for k in sorted(tot_count)})
print("strict fail by #object groups:", {k: f"{fail_objs[k]}/{n_objs[k]}" for k in sorted(n_objs)})
