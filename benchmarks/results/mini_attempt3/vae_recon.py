import numpy as np, torch, collections
from diffusers import AutoencoderKL
from linfusion.mini.bundle import PIPELINE_DIR
from linfusion.mini.checker import AdherenceChecker
from linfusion.mini.world import parse_prompt, prompt_set, render
from linfusion.mini.data import to_tensor, to_uint8
from linfusion.mini.quality import psnr
torch.set_num_threads(1)
vae = AutoencoderKL.from_pretrained(str(PIPELINE_DIR / "vae"), dtype=torch.float32).eval()
prompts = prompt_set("heldout", 96)
images = np.stack([np.asarray(render(parse_prompt(p), 128, 128)) for p in prompts])
with torch.no_grad():
    rec = to_uint8(vae.decode(vae.encode(to_tensor(images)).latent_dist.mean).sample)
ch = AdherenceChecker()
fails = collections.Counter(); tot = collections.Counter(); passed = 0
for r, p in zip(rec, prompts):
    s = ch.score(r, p); passed += s["passed"]
    for k, v in s["attributes"].items():
        key = k.split(":")[0] if ":" in k else k
        tot[key] += 1; fails[key] += (not v)
print("recon strict", passed / len(prompts), "psnr", np.mean([psnr(a, b) for a, b in zip(rec, images)]))
print({k: f"{fails[k]}/{tot[k]}" for k in tot})
gt = sum(ch.check(i, p) for i, p in zip(images, prompts)); print("GT strict", gt / len(prompts))
from PIL import Image
bad = [(i, s) for i, (r, p) in enumerate(zip(rec, prompts)) if not (s := ch.score(r, p))["passed"]][:8]
tiles = []
for i, s in bad:
    print(prompts[i], "|", [k for k, v in s["attributes"].items() if not v])
    tiles.append(np.concatenate([images[i], rec[i]], 1))
grid = np.concatenate(tiles, 0)
Image.fromarray(grid).resize((grid.shape[1] * 2, grid.shape[0] * 2), Image.NEAREST).save("/tmp/vae_fails.png")
