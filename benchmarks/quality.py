"""LinFusion-Mini quality benchmark: adherence, PSNR/SSIM vs the teacher, cross-resolution, time.

    python benchmarks/quality.py                     # bundled pipeline + adapters -> benchmarks/results/
    python benchmarks/quality.py --pipeline DIR --adapter-linear A --adapter-local B
    python benchmarks/quality.py --quick             # 2 prompts, 2 steps, base resolution: CPU smoke test

Rows: teacher, zero_shot_linear, zero_shot_local (patched, not distilled), linear, local
(distilled adapters) at the base resolution, 2x and 4x. Implementation:
``linfusion.mini.quality`` (importable, used by the tests).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from linfusion.mini.quality import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
