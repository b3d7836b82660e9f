"""Sampler sweep on the attempt-4 teacher (48 held-out prompts, 128 px, CPU)."""
import sys, json, collections, time, torch
from linfusion.mini.bundle import load_mini_pipeline
from linfusion.mini.checker import AdherenceChecker
from linfusion.mini.world import prompt_set
from linfusion.mini.quality import generate
from diffusers import DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler, DPMSolverSDEScheduler, UniPCMultistepScheduler
torch.set_num_threads(2)
pipe = load_mini_pipeline(); pipe.set_progress_bar_config(disable=True)
base = pipe.scheduler.config
prompts = prompt_set("heldout", 48)
ch = AdherenceChecker()
def evaluate(name, sched, steps, cfg):
    pipe.scheduler = sched
    t = time.time()
    imgs = generate(pipe, prompts, size=128, steps=steps, seed=0, batch=16, guidance_scale=cfg)
    fails = collections.Counter(); passed = 0; claims = 0; n = 0
    for r, p in zip(imgs, prompts):
        s = ch.score(r, p); passed += s["passed"]
        for k, v in s["attributes"].items():
            n += 1; claims += v
            if not v: fails[k.split(".")[-1] if "." in k else "rel"] += 1
    print(json.dumps({"name": name, "steps": steps, "cfg": cfg, "strict": round(passed / len(prompts), 3),
                      "claims": round(claims / n, 3), "fails": dict(fails), "s": round(time.time() - t)}), flush=True)
configs = {
 "dpm++2m": lambda: DPMSolverMultistepScheduler.from_config(base),
 "dpm++2m_sde": lambda: DPMSolverMultistepScheduler.from_config(base, algorithm_type="sde-dpmsolver++"),
 "euler_a": lambda: EulerAncestralDiscreteScheduler.from_config(base),
 "unipc": lambda: UniPCMultistepScheduler.from_config(base),
}
for spec in sys.argv[1:]:
    name, steps, cfg = spec.split(":")
    torch.manual_seed(0)
    evaluate(name, configs[name](), int(steps), float(cfg))
