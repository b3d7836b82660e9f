import numpy as np, torch, collections
from linfusion.mini.bundle import load_mini_pipeline
from linfusion.mini.checker import AdherenceChecker
from linfusion.mini.world import prompt_set, parse_prompt
from linfusion.mini.quality import generate
torch.set_num_threads(1)
pipe = load_mini_pipeline(); pipe.set_progress_bar_config(disable=True)
prompts = prompt_set("heldout", 48)
imgs = generate(pipe, prompts, size=128, steps=20, seed=0, batch=16)
np.save("/tmp/teacher48.npy", imgs)
ch = AdherenceChecker(); c = collections.Counter()
for r, p in zip(imgs, prompts):
    s = ch.score(r, p); scene = parse_prompt(p); comps = s["analysis"].components
    for n, obj in enumerate(scene.objects):
        if s["attributes"][f"obj{n}.count"]:
            continue
        same_colour = sum(1 for x in comps if x.colour == obj.colour)
        same_shape = sum(1 for x in comps if x.colour == obj.colour and x.shape == obj.shape)
        c["more blobs of the colour" if same_colour > obj.count else "fewer blobs" if same_colour < obj.count else "right number of blobs, wrong shape"] += 1
print(dict(c))
