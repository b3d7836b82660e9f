"""CPU pilot: fine-tune the attempt-4 teacher for a few minutes with timesteps drawn from the
count-deciding band (t in [550, 750), where SDEdit-from-truth showed counts are decided) vs the
attempt-4 distribution, same data and seed; then count failures on 48 held-out prompts."""
import sys, json, collections, time, torch, numpy as np
import linfusion.mini.train as T
import linfusion.mini.model as mm
from linfusion.mini.bundle import load_mini_pipeline
from linfusion.mini.checker import AdherenceChecker
from linfusion.mini.data import RenderStream
from linfusion.mini.world import prompt_set
from linfusion.mini.quality import generate
torch.set_num_threads(2)
arm, steps = sys.argv[1], int(sys.argv[2])
if arm == "band":
    T.MID_T, T.MID_T_SHARE = (550, 750), 0.9
torch.manual_seed(0); np.random.seed(0)
pipe = load_mini_pipeline(); pipe.set_progress_bar_config(disable=True)
dev = torch.device("cpu")
stream = RenderStream(1234, chunk=64, size=128, workers=0)
bank = T.Bank(4096, (8, 32, 32), len(mm.scene_targets(T._any_scene())), dev, torch.float32)
bank.add_chunks([stream.get() for _ in range(24)], pipe.vae, pipe.tokenizer, dev)
t0 = time.time()
s = T.train_dit(pipe.transformer, pipe.text_encoder, pipe.tokenizer, pipe.vae, bank, stream, pipe.scheduler,
                T.Budget(1e9, steps), dev, 16, 1e-4, ema_decay=0.99)
pipe.transformer.eval()
prompts = prompt_set("heldout", 48)
imgs = generate(pipe, prompts, size=128, steps=20, seed=0, batch=16)
ch = AdherenceChecker(); fails = collections.Counter(); passed = 0
for r, p in zip(imgs, prompts):
    sc = ch.score(r, p); passed += sc["passed"]
    for k, v in sc["attributes"].items():
        if not v: fails[k.split(".")[-1] if "." in k else "rel"] += 1
print(json.dumps({"arm": arm, "steps": steps, "train_s": round(time.time() - t0), "strict": round(passed / 48, 3),
                  "fails": dict(fails)}), flush=True)
