"""patch_pipeline / unpatch_pipeline / adapters on a tiny pipeline of every family."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tiny_pipelines import FAMILIES, VIDEO_FAMILIES, build_tiny_pipeline, call_kwargs

from linfusion import (
    AdapterMismatchError,
    PatchConfig,
    UnsupportedModelError,
    describe,
    is_patched,
    patch_model,
    patch_pipeline,
    save_adapter,
    unpatch_pipeline,
)
from linfusion.patch import denoisers, iter_processors

# layers="all": tiny models are far below the crossover, where the default ("auto") runs dense attention
METHOD_OPTIONS = {"linear": {"method": "linear", "layers": "all"}, "local": {"method": "local", "window": 2, "layers": "all"}}


def generate(pipe, family: str, **overrides) -> np.ndarray:
    result = pipe(**call_kwargs(family, **overrides))
    return np.asarray(result.frames if family in VIDEO_FAMILIES else result.images)


def perturb_new_parameters(pipe, seed: int = 0) -> None:
    """Move every new parameter off its initial value so a lost weight changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, _, processor in iter_processors(pipe):
            for p in processor.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("method", ["linear", "local"])
@pytest.mark.parametrize("family", FAMILIES)
def test_patch_runs_differs_and_unpatch_restores_bit_for_bit(family, method):
    pipe = build_tiny_pipeline(family)
    original = generate(pipe, family)
    patch_pipeline(pipe, **METHOD_OPTIONS[method])
    assert is_patched(pipe)
    patched = generate(pipe, family)
    assert np.isfinite(patched).all()
    assert not np.array_equal(patched, original)
    unpatch_pipeline(pipe)
    assert not is_patched(pipe)
    assert np.array_equal(generate(pipe, family), original)


@pytest.mark.parametrize(
    "family,options",
    [
        ("sd15", {"method": "linear", "gate": True}),
        ("sdxl", {"method": "linear", "feature_map": "hedgehog"}),
        ("pixart_sigma", {"method": "linear", "feature_map": "relu", "conv_v": True}),
        ("flux", {"method": "local", "window": 2, "global_pool": 2}),
        ("sd3", {"method": "linear", "gate": True}),
        ("wan22", {"method": "linear"}),
        ("cogvideox", {"method": "local", "window": (1, 2, 2), "global_pool": 2, "gate": True}),
    ],
)
def test_adapter_round_trip_into_fresh_pipeline(tmp_path, family, options):
    pipe = patch_pipeline(build_tiny_pipeline(family), layers="all", **options)
    perturb_new_parameters(pipe)
    expected = generate(pipe, family)
    save_adapter(pipe, tmp_path / "adapter")
    meta = json.loads((tmp_path / "adapter" / "linfusion_adapter.json").read_text())
    assert set(meta["components"]) == {name for name, _ in denoisers(pipe)}

    fresh = build_tiny_pipeline(family)
    patch_pipeline(fresh, adapter=str(tmp_path / "adapter"))
    assert np.array_equal(generate(fresh, family), expected)
    for name, info in describe(fresh)["components"].items():
        saved = describe(pipe)["components"][name]
        for key in ("method", "patched_layers", "gates", "new_parameters"):
            assert info[key] == saved[key]


def test_resolution_changes_between_calls():
    pipe = patch_pipeline(build_tiny_pipeline("sd15"), method="local", window=3, layers="all")
    first = generate(pipe, "sd15", height=32, width=48)
    second = generate(pipe, "sd15", height=48, width=24)
    again = generate(pipe, "sd15", height=32, width=48)
    assert first.shape[1:3] == (32, 48) and second.shape[1:3] == (48, 24)
    assert np.array_equal(first, again)


def test_odd_grids_on_unet_levels():
    """Latents 9x13 give UNet levels 9x13 and 5x7 (stride-2 convs round up)."""
    pipe = patch_pipeline(
        build_tiny_pipeline("sd15"), method="local", window=2, shape="tile", tile=(2, 4), layers="all"
    )
    unet = pipe.unet
    context = torch.randn(1, 16, unet.config.cross_attention_dim)
    with torch.no_grad():
        out = unet(torch.randn(1, 4, 9, 13), 10, encoder_hidden_states=context).sample
    assert out.shape == (1, 4, 9, 13) and torch.isfinite(out).all()
    grid = next(iter_processors(pipe))[2].token_grid
    seen = {grid.for_tokens(n) for n in (9 * 13, 5 * 7)}
    assert seen == {(9, 13), (5, 7)}


def test_cfg_batch_rows_are_independent():
    """With CFG the batch holds [uncond, cond]; a patched layer must not mix them."""
    pipe = patch_pipeline(build_tiny_pipeline("sd15"), method="linear", layers="all")
    unet = pipe.unet
    sample = torch.randn(2, 4, 8, 12)
    context = torch.randn(2, 16, unet.config.cross_attention_dim)
    with torch.no_grad():
        both = unet(sample, 10, encoder_hidden_states=context).sample
        single = unet(sample[1:], 10, encoder_hidden_states=context[1:]).sample
    torch.testing.assert_close(both[1:], single, rtol=1e-5, atol=1e-5)


def test_lora_on_patched_model_runs():
    from peft import LoraConfig

    pipe = patch_pipeline(build_tiny_pipeline("sd15"), method="linear", layers="all")
    before = generate(pipe, "sd15")
    pipe.unet.add_adapter(LoraConfig(r=2, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False))
    after = generate(pipe, "sd15")
    assert np.isfinite(after).all() and not np.array_equal(before, after)
    lora_names = [n for n, _ in pipe.unet.named_parameters() if "lora" in n]
    assert lora_names and not any("processor" in n for n in lora_names)


def test_layer_selection_by_list_and_predicate():
    pipe = build_tiny_pipeline("flux")
    names = describe(pipe)["components"]["transformer"]["self_attention_layers"]
    patch_pipeline(pipe, layers=[names[0]])
    assert describe(pipe)["components"]["transformer"]["patched_layers"] == [names[0]]
    patch_pipeline(pipe, layers=lambda name: name.startswith("single_"))  # re-patch replaces
    patched = describe(pipe)["components"]["transformer"]["patched_layers"]
    assert patched and all(n.startswith("single_") for n in patched)
    with pytest.raises(ValueError, match="no self-attention layer named"):
        patch_pipeline(pipe, layers=["not.a.layer"])


def test_qualified_layer_names_pick_one_expert_of_wan22():
    pipe = build_tiny_pipeline("wan22")
    patch_pipeline(pipe, layers=["transformer_2.blocks.0.attn1"])
    info = describe(pipe)["components"]
    assert info["transformer_2"]["patched_layers"] == ["blocks.0.attn1"]
    assert info["transformer"]["patched_layers"] == []


def test_patch_model_on_bare_denoiser_and_describe():
    pipe = build_tiny_pipeline("pixart_sigma")
    patch_model(pipe.transformer, method="linear", feature_map="relu")
    info = describe(pipe.transformer)
    comp = info["components"]["transformer"]
    assert info["patched"] and comp["method"] == "linear" and comp["options"]["feature_map"] == "relu"
    assert comp["patched_layers"] == comp["self_attention_layers"] and comp["new_parameters"] > 0


# --- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options,match",
    [
        ({"method": "local", "window": 0}, "window"),
        ({"method": "local", "window": -3}, "window"),
        ({"method": "linear", "feature_map": "cosine"}, "feature_map"),
        ({"method": "quadratic"}, "method"),
        ({"method": "local", "shape": "square"}, "shape"),
        ({"method": "linear", "backend": "cuda"}, "backend"),
        # an option of the other method would be ignored: refused instead
        ({"method": "linear", "window": 8}, r"\['window'\] do not apply to method='linear'"),
        ({"method": "local", "feature_map": "relu", "conv_v": True}, r"\['conv_v', 'feature_map'\] do not apply"),
        ({"method": "local", "window": 4, "temporal_window": 2}, "temporal_window applies to video models"),
        ({"method": "local", "window": (1, 2, 3)}, r"window \(1, 2, 3\) has 3 radii but UNet2DConditionModel's token grid has 2"),
        ({"method": "linear", "layers": lambda name: False}, "chose none of the"),
    ],
)
def test_invalid_options_raise_before_anything_changes(options, match):
    pipe = build_tiny_pipeline("sd15")
    processors = dict(pipe.unet.attn_processors)
    with pytest.raises(ValueError, match=match):
        patch_pipeline(pipe, **options)
    assert pipe.unet.attn_processors == processors and not is_patched(pipe)


def test_unknown_option_is_a_type_error_listing_supported():
    with pytest.raises(TypeError, match="supported options"):
        patch_pipeline(build_tiny_pipeline("sd15"), method="linear", windw=3)


def test_unsupported_model_lists_supported_families():
    with pytest.raises(UnsupportedModelError, match="Supported denoisers: .*FLUX"):
        patch_model(torch.nn.Linear(4, 4))

    class NotAPipeline:
        pass

    with pytest.raises(UnsupportedModelError, match="no denoiser"):
        patch_pipeline(NotAPipeline())


def test_fused_qkv_is_refused():
    pipe = build_tiny_pipeline("sd15")
    pipe.fuse_qkv_projections()
    with pytest.raises(UnsupportedModelError, match="fused QKV"):
        patch_pipeline(pipe)
    assert not is_patched(pipe)


def test_ip_adapter_processor_is_refused():
    from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0

    pipe = build_tiny_pipeline("sd15")
    name, attn = next((n, m) for n, m in pipe.unet.named_modules() if n.endswith("attn1"))
    attn.set_processor(
        IPAdapterAttnProcessor2_0(attn.to_q.out_features, cross_attention_dim=pipe.unet.config.cross_attention_dim)
    )
    with pytest.raises(UnsupportedModelError, match="IP-Adapter"):
        patch_pipeline(pipe)


def test_unknown_custom_processor_is_refused():
    from diffusers.models.attention_processor import AttnProcessor2_0

    class MyProcessor(AttnProcessor2_0):
        pass

    pipe = build_tiny_pipeline("pixart_sigma")
    pipe.transformer.set_attn_processor(MyProcessor())
    with pytest.raises(UnsupportedModelError, match="MyProcessor"):
        patch_pipeline(pipe)


def test_unpatch_of_unpatched_pipeline_is_an_error():
    with pytest.raises(ValueError, match="not patched"):
        unpatch_pipeline(build_tiny_pipeline("sd15"))


def test_adapter_for_another_model_is_refused(tmp_path):
    pipe = patch_pipeline(build_tiny_pipeline("sd15"), method="linear")
    save_adapter(pipe, tmp_path / "a")
    with pytest.raises(AdapterMismatchError, match="'unet' component, but FluxPipeline has only"):
        patch_pipeline(build_tiny_pipeline("flux"), adapter=str(tmp_path / "a"))
    pixart = patch_pipeline(build_tiny_pipeline("pixart_sigma"), method="linear")
    save_adapter(pixart, tmp_path / "p")
    with pytest.raises(AdapterMismatchError, match="for the pixart family, the model is flux"):
        patch_pipeline(build_tiny_pipeline("flux"), adapter=str(tmp_path / "p"))
    with pytest.raises(AdapterMismatchError, match="configuration; differing config keys"):
        patch_pipeline(build_tiny_pipeline("sd2_v"), adapter=str(tmp_path / "a"))


def test_adapter_of_other_format_version_is_refused(tmp_path):
    pipe = patch_pipeline(build_tiny_pipeline("sd15"), method="linear")
    save_adapter(pipe, tmp_path / "a")
    config = tmp_path / "a" / "linfusion_adapter.json"
    meta = json.loads(config.read_text())
    meta["format_version"] = 999
    config.write_text(json.dumps(meta))
    with pytest.raises(AdapterMismatchError, match="format 999"):
        patch_pipeline(build_tiny_pipeline("sd15"), adapter=str(tmp_path / "a"))


def test_adapter_with_wrong_weights_rolls_back(tmp_path):
    from safetensors.torch import load_file, save_file

    pipe = patch_pipeline(build_tiny_pipeline("sd15"), method="linear")
    save_adapter(pipe, tmp_path / "a")
    weights = tmp_path / "a" / "linfusion_adapter.safetensors"
    tensors = load_file(weights)
    key = next(iter(tensors))
    tensors[key] = torch.zeros(3)
    save_file(tensors, weights)
    fresh = build_tiny_pipeline("sd15")
    with pytest.raises(AdapterMismatchError, match="do not fit"):
        patch_pipeline(fresh, adapter=str(tmp_path / "a"))
    assert not is_patched(fresh)


def test_missing_adapter_folder_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(AdapterMismatchError, match="not a LinFusion adapter"):
        patch_pipeline(build_tiny_pipeline("sd15"), adapter=str(tmp_path / "empty"))
    # a path that does not exist is not sent to the hub as a repo id
    with pytest.raises(AdapterMismatchError, match="no adapter folder at"):
        patch_pipeline(build_tiny_pipeline("sd15"), adapter=str(tmp_path / "missing"))
    with pytest.raises(AdapterMismatchError, match="neither a local adapter folder nor a valid hub id"):
        patch_pipeline(build_tiny_pipeline("sd15"), adapter="not a repo id")


def test_damaged_adapter_files_are_named(tmp_path):
    pipe = build_tiny_pipeline("sd15")
    save_adapter(patch_pipeline(pipe, method="linear"), tmp_path / "ad")
    config, weights = tmp_path / "ad" / "linfusion_adapter.json", tmp_path / "ad" / "linfusion_adapter.safetensors"
    good_config, good_weights = config.read_text(), weights.read_bytes()
    fresh = build_tiny_pipeline("sd15")
    config.write_text("{not json")
    with pytest.raises(AdapterMismatchError, match="linfusion_adapter.json is not valid JSON"):
        patch_pipeline(fresh, adapter=str(tmp_path / "ad"))
    config.write_text(good_config)
    weights.write_bytes(b"garbage" * 10)
    with pytest.raises(AdapterMismatchError, match="linfusion_adapter.safetensors is not a readable safetensors file"):
        patch_pipeline(fresh, adapter=str(tmp_path / "ad"))
    assert not is_patched(fresh)
    weights.write_bytes(good_weights)
    patch_pipeline(fresh, adapter=str(tmp_path / "ad"))
    assert is_patched(fresh)
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(FileExistsError, match="is a file; an adapter is saved as a folder"):
        save_adapter(fresh, tmp_path / "a-file")


def test_predicate_selecting_no_layer_of_a_bare_model_is_an_error():
    pipe = build_tiny_pipeline("pixart_sigma")
    with pytest.raises(ValueError, match="chose none of the 2 self-attention layers of PixArtTransformer2DModel"):
        patch_model(pipe.transformer, method="linear", layers=lambda name: name.startswith("nothing"))
    assert not is_patched(pipe)


def test_temporal_window_on_a_video_model_is_accepted():
    pipe = build_tiny_pipeline("wan21")
    patch_pipeline(pipe, method="local", window=4, temporal_window=2)
    assert describe(pipe)["components"]["transformer"]["options"]["temporal_window"] == 2


def test_save_adapter_of_unpatched_pipeline_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="not patched"):
        save_adapter(build_tiny_pipeline("sd15"), tmp_path / "a")


def test_adapter_keeps_trained_base_weights_and_unpatch_restores_them(tmp_path):
    from linfusion.patch import mark_base_params_trained

    pipe = build_tiny_pipeline("sd15")
    original = generate(pipe, "sd15")
    patch_pipeline(pipe, method="linear", layers="all")
    name = next(n for n, _ in pipe.unet.named_parameters() if n.endswith("attn1.to_q.weight"))
    mark_base_params_trained(pipe.unet, [name])
    with torch.no_grad():
        dict(pipe.unet.named_parameters())[name].mul_(1.5)
    expected = generate(pipe, "sd15")
    save_adapter(pipe, tmp_path / "a")
    fresh = patch_pipeline(build_tiny_pipeline("sd15"), adapter=str(tmp_path / "a"))
    assert np.array_equal(generate(fresh, "sd15"), expected)
    unpatch_pipeline(pipe)
    assert np.array_equal(generate(pipe, "sd15"), original)


def test_retrained_base_weights_turn_the_dense_fallback_off(tmp_path):
    """Dense attention on projections retrained for the replacement is neither the original model nor
    the student, so once base weights are trained no layer falls back, in memory or from an adapter."""
    from linfusion.patch import mark_base_params_trained, patch_record

    pipe = build_tiny_pipeline("sd15")
    patch_pipeline(pipe, method="linear", layers="all", dense_fallback=True)
    generate(pipe, "sd15")
    processors = list(patch_record(pipe.unet).processors().values())
    assert {p.last_choice for p in processors} == {"dense"}  # tiny sizes: the fallback would run dense
    name = next(n for n, _ in pipe.unet.named_parameters() if n.endswith("attn1.to_q.weight"))
    mark_base_params_trained(pipe.unet, [name])
    with torch.no_grad():
        dict(pipe.unet.named_parameters())[name].mul_(1.5)
    student = generate(pipe, "sd15")
    assert {p.last_choice for p in processors} == {"patched"}
    save_adapter(pipe, tmp_path / "a", dense_fallback=True)  # what trainers ask for
    meta = json.loads((tmp_path / "a" / "linfusion_adapter.json").read_text())
    assert meta["components"]["unet"]["options"]["dense_fallback"] is False
    with pytest.raises(ValueError, match="dense_fallback=True cannot be honoured"):
        patch_pipeline(build_tiny_pipeline("sd15"), adapter=str(tmp_path / "a"), dense_fallback=True)
    fresh = patch_pipeline(build_tiny_pipeline("sd15"), adapter=str(tmp_path / "a"))
    assert np.array_equal(generate(fresh, "sd15"), student)


def test_config_round_trip():
    config = PatchConfig(method="local", window=(2, 3), tile=[2, 4], shape="tile")
    assert PatchConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


# --- layers="auto": never slower ----------------------------------------------------------------


def test_auto_runs_dense_below_the_crossover_and_says_so_once():
    pipe = build_tiny_pipeline("flux")
    original = generate(pipe, "flux")
    patch_pipeline(pipe, method="linear")  # default layers="auto"
    with pytest.warns(UserWarning, match="dense attention is estimated faster"):
        patched = generate(pipe, "flux")
    np.testing.assert_allclose(patched, original, atol=1e-5)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per resolution: no second notice
        generate(pipe, "flux")
    assert {p.last_choice for _, _, p in iter_processors(pipe)} == {"dense"}


@pytest.mark.parametrize("family", FAMILIES)
def test_auto_hands_dense_layers_to_the_original_processor_bit_for_bit(family):
    """A layer kept dense runs the replaced diffusers processor itself: same output, same speed."""
    pipe = build_tiny_pipeline(family)
    original = generate(pipe, family)
    patch_pipeline(pipe, method="linear")
    calls = []
    for _, _, processor in iter_processors(pipe):
        stock = processor._original
        processor.bind_original(lambda *args, _stock=stock, **kwargs: calls.append(1) or _stock(*args, **kwargs))
    with pytest.warns(UserWarning, match="dense attention is estimated faster"):
        patched = generate(pipe, family)
    assert np.array_equal(patched, original)
    assert len(calls) >= len(list(iter_processors(pipe)))
    assert {p.last_choice for _, _, p in iter_processors(pipe)} == {"dense"}


def test_auto_runs_the_patch_above_the_crossover_and_while_training():
    from linfusion.processor import DenseFallback

    pipe = patch_pipeline(build_tiny_pipeline("flux"), method="linear")
    _, _, processor = next(iter_processors(pipe))
    fallback = processor.dense_fallback
    assert isinstance(fallback, DenseFallback)
    processor.token_grid.record((512, 512))
    with torch.no_grad():
        big = torch.empty(1, 512 * 512, fallback.channels)
        assert fallback.patched_is_faster(processor, big, 0)  # 262k tokens: linear wins
        small = torch.empty(1, 16, fallback.channels)
        processor.token_grid.record((4, 4))
        assert not fallback.patched_is_faster(processor, small, 0)
    assert fallback.patched_is_faster(processor, small, 0)  # gradients on: always train the patch


def test_dense_fallback_false_forces_the_patch_and_adapters_keep_the_choice(tmp_path):
    pipe = build_tiny_pipeline("sd15")
    original = generate(pipe, "sd15")
    patch_pipeline(pipe, method="linear", dense_fallback=False)
    assert not np.array_equal(generate(pipe, "sd15"), original)
    save_adapter(pipe, tmp_path / "a")
    fresh = patch_pipeline(build_tiny_pipeline("sd15"), adapter=str(tmp_path / "a"))
    assert all(p.dense_fallback is None for _, _, p in iter_processors(fresh))
    fresh = patch_pipeline(build_tiny_pipeline("sd15"), adapter=str(tmp_path / "a"), dense_fallback=True)
    assert all(p.dense_fallback is not None for _, _, p in iter_processors(fresh))
