"""Check the crossover cost model (``linfusion/crossover.py``) against measured end-to-end rows.

For each (model, resolution) of ``benchmarks/results/e2e.json`` with a dense row and an
all-layers patched row (``linear``, ``linear_relu``, ``local_tile``, ``local_circle``), it sums the
model's per-layer estimates over the real layer inventory and compares:

* ``measured_delta_ms``: patched step minus the strongest dense step of the same call;
* ``predicted_delta_ms``: Σ over self-attention layers of (patched layer − dense layer);
* ``auto_layers`` of ``layers``: how many layers ``layers="auto"`` would patch at that size, and
  ``auto_predicted_ms`` = dense step + Σ over those layers of (patched − dense).

A row where the measured delta is positive (the patch is slower) while ``auto`` would still
patch every layer, or where the model predicts the slower all-layers patch to pay off, is a
calibration problem: ``auto`` would make the user slower (``auto_risk``, exit status 1). When the
model agrees the all-layers patch is slower and ``auto`` patches only the subset it predicts to
pay off, the row is ``auto_unverified``: only a measured ``*_auto`` row can settle it. The
check needs no GPU: it only reads the JSON and runs the cost model with the ``cuda-sm90`` profile.

``--fit`` re-fits the profile's ``layer_overhead_us`` (per method): the largest per-layer
excess of a measured-slower all-layers row over the kernel-level estimate, so that no such row
is predicted to pay off; ``--write`` stores it in ``linfusion/crossover_profiles.json``.

    python benchmarks/crossover_vs_e2e.py [--e2e benchmarks/results/e2e.json] [--out FILE.json] [--fit [--write]]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path

import torch

from linfusion.config import PatchConfig
from linfusion.crossover import (
    PROFILES_PATH,
    DeviceProfile,
    estimate_attention_ms,
    patched_layer_ms,
    patched_pays_off,
    profile_for,
)

DENSE_IMPLS = ("cudnn", "cudnn_fused", "sdpa_default")


@dataclasses.dataclass(frozen=True)
class LayerGroup:
    """``count`` self-attention layers of one shape. ``grid_divisor``: pixels per token per side."""

    count: int
    channels: int
    heads: int
    head_dim: int
    grid_divisor: int
    text_len: int = 0
    mlp_ratio: float = 1 / 16


# Real-size inventories of the models built by benchmarks/e2e.py (CONFIGS there).
INVENTORY: dict[str, tuple[int, list[LayerGroup]]] = {  # model -> (batch, layer groups)
    # 19 double-stream + 38 single-stream blocks, joint attention over 512 text tokens
    "flux": (1, [LayerGroup(57, 3072, 24, 128, 16, text_len=512)]),
    # UNet levels 1 and 2 (latent /8, then /2 and /4): 2+2+6 and 20+30+10 transformer layers
    "sdxl": (2, [LayerGroup(10, 640, 10, 64, 16), LayerGroup(60, 1280, 20, 64, 32)]),
    # 24 joint blocks (333 text tokens) + 13 dual-attention self-only layers
    "sd35m": (2, [LayerGroup(24, 1536, 24, 64, 16, text_len=333), LayerGroup(13, 1536, 24, 64, 16)]),
    "pixart": (2, [LayerGroup(28, 1152, 16, 72, 16)]),
    "wan13b": (2, [LayerGroup(30, 1536, 12, 128, 16)]),
}
VIDEO = {"480p-81f": (21, 480, 832), "720p-81f": (21, 720, 1280)}  # latent frames, height, width
IMPL_CONFIGS = {
    "linear": dict(method="linear"),
    "linear_relu": dict(method="linear", feature_map="relu", feature_mlp=False),
    "local_tile": dict(method="local", window=16, shape="tile"),
    "local_circle": dict(method="local", window=16, shape="circle"),
}


def grid_for(resolution: str, group: LayerGroup) -> tuple[int, ...]:
    if resolution in VIDEO:
        frames, h, w = VIDEO[resolution]
        return (frames, h // group.grid_divisor, w // group.grid_divisor)
    h, w = (int(x) for x in resolution.split("x"))
    return (h // group.grid_divisor, w // group.grid_divisor)


def estimate(model: str, resolution: str, impl: str, profile: DeviceProfile | str = "cuda-sm90") -> dict:
    """Per-step estimates (ms) of one patched configuration against dense, over every layer."""
    batch, groups = INVENTORY[model]
    options = dict(IMPL_CONFIGS[impl])
    if resolution in VIDEO and options["method"] == "local":
        options["temporal_window"] = 3
    config = PatchConfig(layers="all", **options)
    delta = auto_delta = 0.0
    auto_layers = total_layers = 0
    for g in groups:
        grid = grid_for(resolution, g)
        tokens = math.prod(grid)
        kw = dict(batch=batch, heads=g.heads, tokens=tokens, head_dim=g.head_dim, text_len=g.text_len,
                  dtype=torch.bfloat16, device="cpu", profile=profile)
        dense = estimate_attention_ms("dense", **kw)
        patched = patched_layer_ms(config, grid=grid, channels=g.channels, mlp_ratio=g.mlp_ratio, **kw)
        pays = patched_pays_off(config, grid=grid, channels=g.channels, mlp_ratio=g.mlp_ratio, **kw)
        delta += g.count * (patched - dense)
        total_layers += g.count
        if pays:
            auto_layers += g.count
            auto_delta += g.count * (patched - dense)
    return dict(predicted_delta_ms=delta, auto_layers=auto_layers, layers=total_layers, auto_delta_ms=auto_delta)


def compare(rows: list[dict], profile: DeviceProfile | str = "cuda-sm90") -> list[dict]:
    """One result per (model, resolution, patched impl) that has a dense row beside it."""
    by_key: dict[tuple[str, str], dict[str, float]] = {}
    for r in rows:
        if r.get("step_ms") and r["model"] in INVENTORY:
            by_key.setdefault((r["model"], r["resolution"]), {})[r["impl"]] = r["step_ms"]
    out = []
    for (model, resolution), steps in sorted(by_key.items()):
        dense_impls = [i for i in DENSE_IMPLS if i in steps]
        if not dense_impls:
            continue
        dense_impl = min(dense_impls, key=steps.get)
        dense = steps[dense_impl]
        for impl in IMPL_CONFIGS:
            if impl not in steps:
                continue
            est = estimate(model, resolution, impl, profile)
            measured = steps[impl] - dense
            out.append(dict(
                model=model, resolution=resolution, impl=impl, dense_impl=dense_impl, dense_ms=round(dense, 1),
                measured_ms=round(steps[impl], 1), measured_delta_ms=round(measured, 1),
                predicted_delta_ms=round(est["predicted_delta_ms"], 1),
                auto_layers=est["auto_layers"], layers=est["layers"],
                auto_predicted_ms=round(dense + est["auto_delta_ms"], 1),
                # auto's dense layers run the stock processors: its reference is stock cuDNN,
                # which the e2e runs always time in the same call as the auto rows
                **auto_verdict(measured, est, steps.get(AUTO_ROWS.get(impl, "")), steps.get("cudnn", dense)),
            ))
    return out


#: the measured ``layers="auto"`` row of each all-layers impl, where e2e.py has one
AUTO_ROWS = {"linear": "linear_auto", "local_circle": "local_circle_auto"}
#: an auto row this much slower than dense in the same call counts as slower (1K steps vary ~2-3%)
AUTO_TOLERANCE = 1.03


def auto_verdict(measured_delta_ms: float, est: dict, auto_ms: float | None = None,
                 dense_ms: float | None = None) -> dict[str, bool]:
    """Whether a measured all-layers row shows ``layers="auto"`` making the user slower.

    ``auto_risk``: the all-layers patch measured slower, yet ``auto`` patches every layer, or the
    model even predicts the all-layers patch to pay off (it has the sign wrong): a miscalibration.
    ``auto_unverified``: the all-layers patch measured slower and the model agrees, but ``auto``
    patches a subset it predicts to pay off (SDXL's largest level). The all-layers row cannot
    decide that subset; only a measured ``*_auto`` row can: given ``auto_ms`` (and ``dense_ms``),
    it settles the row, and an auto row slower than dense (beyond ``AUTO_TOLERANCE``) is a risk.
    """
    slower_patched = measured_delta_ms > 0 and est["auto_layers"] > 0
    subset_agreed = est["auto_layers"] < est["layers"] and est["predicted_delta_ms"] > 0
    risk, unverified = slower_patched and not subset_agreed, slower_patched and subset_agreed
    if auto_ms is not None and dense_ms is not None:
        risk = risk or auto_ms > AUTO_TOLERANCE * dense_ms
        unverified = False
    return dict(auto_risk=risk, auto_unverified=unverified)


def fit_layer_overhead(rows: list[dict], profile: DeviceProfile | str = "cuda-sm90") -> dict[str, float]:
    """Per-method fixed cost per patched layer (µs) that makes every measured-slower row predicted slower."""
    bare = dataclasses.replace(profile_for("cpu", profile), layer_overhead_us={})
    fitted = {"linear": 0.0, "local": 0.0}
    for r in compare(rows, bare):
        if r["measured_delta_ms"] <= 0:
            continue
        method = IMPL_CONFIGS[r["impl"]]["method"]
        excess_us = (r["measured_delta_ms"] - r["predicted_delta_ms"]) / r["layers"] * 1e3
        fitted[method] = max(fitted[method], math.ceil(excess_us / 10) * 10)
    return fitted


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--e2e", default="benchmarks/results/e2e.json")
    parser.add_argument("--profile", default="cuda-sm90")
    parser.add_argument("--out", default=None, help="write the comparison as JSON here")
    parser.add_argument("--fit", action="store_true", help="re-fit the profile's layer_overhead_us")
    parser.add_argument("--write", action="store_true", help="with --fit: store it in crossover_profiles.json")
    args = parser.parse_args(argv)
    rows = json.loads(Path(args.e2e).read_text())["rows"]
    profile = profile_for("cpu", args.profile)
    if args.fit:
        fitted = fit_layer_overhead(rows, profile)
        print(f"fitted layer_overhead_us for {args.profile}: {fitted}")
        profile = dataclasses.replace(profile, layer_overhead_us=fitted)
        if args.write:
            data = json.loads(PROFILES_PATH.read_text())
            data["profiles"][args.profile]["layer_overhead_us"] = fitted
            data["profiles"][args.profile]["layer_overhead_source"] = (
                f"benchmarks/crossover_vs_e2e.py --fit on {args.e2e} ({len(rows)} rows)")
            PROFILES_PATH.write_text(json.dumps(data, indent=2) + "\n")
            print(f"wrote {PROFILES_PATH}")
    result = compare(rows, profile)
    cols = ("model", "resolution", "impl", "dense_ms", "measured_ms", "measured_delta_ms", "predicted_delta_ms",
            "auto_layers", "layers", "auto_risk", "auto_unverified")
    print(" | ".join(cols))
    for r in result:
        print(" | ".join(str(r[c]) for c in cols))
    if args.out:
        Path(args.out).write_text(json.dumps({"profile": args.profile, "layer_overhead_us": profile.layer_overhead_us,
                                              "source": args.e2e, "rows": result}, indent=1))
    return 1 if any(r["auto_risk"] for r in result) else 0


if __name__ == "__main__":
    sys.exit(main())
