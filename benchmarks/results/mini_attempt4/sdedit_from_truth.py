"""Where are copies made? Start sampling from the noised ground truth at t0 (attempt-4 teacher, CPU)."""
import json, collections, torch, numpy as np
from linfusion.mini.bundle import load_mini_pipeline
from linfusion.mini.checker import AdherenceChecker
from linfusion.mini.world import prompt_set, parse_prompt, render
torch.set_num_threads(2)
pipe = load_mini_pipeline(); pipe.set_progress_bar_config(disable=True)
prompts = prompt_set("heldout", 48)
ch = AdherenceChecker()
truth = np.stack([render(parse_prompt(p), 128, 128, rng=i) for i, p in enumerate(prompts)])
x = torch.from_numpy(truth).permute(0, 3, 1, 2).float() / 127.5 - 1
with torch.no_grad():
    z0 = pipe.vae.encode(x).latent_dist.mean * pipe.vae.config.scaling_factor
sched = pipe.scheduler
sched.set_timesteps(20)
full = [int(t) for t in sched.timesteps]
g = torch.Generator().manual_seed(0)
noise = torch.randn(z0.shape, generator=g)
for t0 in (999, 900, 800, 700, 600, 500):
    ts = [t for t in full if t <= t0]
    zt = sched.add_noise(z0, noise, torch.tensor([ts[0]]))
    imgs = []
    for s in range(0, len(prompts), 16):
        out = pipe(prompt=prompts[s:s+16], negative_prompt="", latents=zt[s:s+16], height=128, width=128,
                   timesteps=ts, guidance_scale=4.5, use_resolution_binning=False, clean_caption=False,
                   max_sequence_length=48, output_type="np").images
        imgs += [(np.clip(im, 0, 1) * 255).round().astype(np.uint8) for im in out]
    fails = collections.Counter(); passed = 0
    for r, p in zip(imgs, prompts):
        sc = ch.score(r, p); passed += sc["passed"]
        for k, v in sc["attributes"].items():
            if not v: fails[k.split(".")[-1] if "." in k else "rel"] += 1
    print(json.dumps({"t0": ts[0], "steps": len(ts), "strict": round(passed / len(prompts), 3), "fails": dict(fails)}), flush=True)
