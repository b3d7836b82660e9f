"""Which shapes and sizes a bundled Mini model gets wrong (CPU analysis, 96 held-out prompts, 128 px).

    python benchmarks/results/mini_attempt6/shape_failures.py teacher > benchmarks/results/mini_attempt6/shape_failures_teacher.json
    python benchmarks/results/mini_attempt6/shape_failures.py linear  > .../shape_failures_linear.json   (or local)

Students run their bundled adapter in every layer, as in the quality benchmark.
"""

import collections
import json
import sys

import torch

from linfusion.mini import bundled_adapter
from linfusion.mini.bundle import load_mini_pipeline
from linfusion.mini.checker import AdherenceChecker
from linfusion.mini.quality import apply_patch, generate
from linfusion.mini.world import parse_prompt, prompt_set

model = sys.argv[1] if len(sys.argv) > 1 else "teacher"
torch.manual_seed(0)
pipe = load_mini_pipeline(torch_dtype=torch.float32)
if model != "teacher":
    apply_patch(pipe, None, str(bundled_adapter(model)))
prompts = prompt_set("heldout", 96, seed=0)
images = generate(pipe, prompts, size=128, steps=20, seed=0)
checker = AdherenceChecker()
asked, failed = collections.Counter(), collections.Counter()
by_size, failed_by_size = collections.Counter(), collections.Counter()
seen_as = collections.Counter()
for prompt, image in zip(prompts, images):
    scene = parse_prompt(prompt)
    result = checker.score(image, scene)
    comps = result["analysis"].components
    for n, obj in enumerate(scene.objects):
        asked[obj.shape] += 1
        by_size[obj.size] += 1
        if not result["attributes"][f"obj{n}.shape"]:
            failed[obj.shape] += 1
            failed_by_size[obj.size] += 1
            for c in comps:
                if c.colour == obj.colour and c.shape != obj.shape:
                    seen_as[f"{obj.shape} -> {c.shape}"] += 1
print(json.dumps({
    "model": model,
    "strict": sum(checker.check(im, p) for p, im in zip(prompts, images)) / len(prompts),
    "shape_fail_rate_by_shape": {s: f"{failed[s]}/{asked[s]}" for s in sorted(asked)},
    "shape_fail_rate_by_size": {s: f"{failed_by_size[s]}/{by_size[s]}" for s in sorted(by_size)},
    "confusions": dict(seen_as.most_common()),
}, indent=1))
