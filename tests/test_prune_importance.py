"""Channel importance for structured pruning: masked runner, activation and Shapley importance,
sensitivity-based allocation. Sites are built by hand on the sample LeNet and ResNet."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from nnc_tool.prune.importance import (
    MaskedRunner,
    MaskSite,
    activation_importance,
    sensitivity_allocation,
    shapley_importance,
)

from conftest import SAMPLES

LENET_SITES = [
    MaskSite("conv1", 16, ["/relu1/Relu_output_0"]),  # read only by pool1 -> conv2
    MaskSite("conv2", 32, ["/relu2/Relu_output_0"]),
    MaskSite("fc1", 64, ["/relu3/Relu_output_0"]),
    MaskSite("logits", 10, ["logits"]),  # a graph output: the output itself must come out masked
]
RESNET_SITES = [
    # inside the blocks: BN + Relu, read only by the block's second conv
    MaskSite("layer1.mid", 16, ["/layer1/relu1/Relu_output_0"]),
    MaskSite("layer2.mid", 32, ["/layer2/relu1/Relu_output_0"]),
    MaskSite("layer3.mid", 48, ["/layer3/relu1/Relu_output_0"]),
    # residual streams: every value adding into the stream, masked together
    MaskSite("stream16", 16, ["/stem/stem.2/Relu_output_0", "/layer1/bn2/BatchNormalization_output_0"]),
    MaskSite("stream32", 32, ["/layer2/bn2/BatchNormalization_output_0",
                              "/layer2/shortcut/shortcut.1/BatchNormalization_output_0"]),
]
SITES = {"lenet": LENET_SITES, "resnet": RESNET_SITES}


@pytest.fixture(scope="module")
def models() -> dict[str, onnx.ModelProto]:
    return {name: onnx.load(SAMPLES / f"{name}.onnx") for name in ("lenet", "resnet")}


@pytest.fixture(scope="module")
def calib() -> np.ndarray:
    with np.load(SAMPLES / "digits_calib.npz") as data:
        return data["x"]


def _session(proto, level=ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    options.intra_op_num_threads = 1
    return ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _edited(proto: onnx.ModelProto, edits: dict) -> onnx.ModelProto:
    """A copy of `proto` with initializers changed by edits[name](array) -> array."""
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    for init in out.graph.initializer:
        if init.name in edits:
            init.CopyFrom(numpy_helper.from_array(edits[init.name](numpy_helper.to_array(init).copy()), init.name))
    return out


def _site(name: str) -> MaskSite:
    return next(s for sites in SITES.values() for s in sites if s.name == name)


def _distortion(runner: MaskedRunner, x: np.ndarray, masks: dict) -> float:
    ref = runner.run(x)[0].astype(np.float64)
    return float(np.mean((runner.run(x, masks)[0] - ref) ** 2))


# ---------------------------------------------------------------------------- MaskedRunner


@pytest.mark.parametrize("name", ["lenet", "resnet"])
def test_all_ones_masks_reproduce_the_original(models, calib, name):
    proto = models[name]
    ref = _session(proto).run(None, {"input": calib})[0]
    runner = MaskedRunner(proto, SITES[name])
    out = runner.run(calib)[0]
    assert out.shape == ref.shape
    # default ORT_ENABLE_ALL: the NCHWc pass rounds differently around the Mul nodes
    assert np.abs(out - ref).max() <= 1e-6 * max(1.0, np.abs(ref).max())
    explicit = runner.run(calib, {s.name: np.ones(s.size, np.float32) for s in SITES[name]})[0]
    np.testing.assert_array_equal(explicit, out)
    # without layout optimisation the masked graph is bit-identical to the original
    level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    exact = MaskedRunner(proto, SITES[name], optimization=level).run(calib)[0]
    np.testing.assert_array_equal(exact, _session(proto, level).run(None, {"input": calib})[0])


@pytest.mark.parametrize("name", ["lenet", "resnet"])
def test_masking_a_whole_site_changes_the_output(models, calib, name):
    runner = MaskedRunner(models[name], SITES[name])
    ref = runner.run(calib)[0]
    for site in SITES[name]:
        out = runner.run(calib, {site.name: np.zeros(site.size)})[0]
        assert np.abs(out - ref).max() > 1e-2, site.name


def test_masked_graph_output_and_extra_outputs(models, calib):
    runner = MaskedRunner(models["lenet"], LENET_SITES)
    drop4 = (np.arange(16) != 4).astype(np.float32)
    ref = runner.run(calib, {"conv1": drop4})[0]
    keep = (np.arange(10) % 3 != 0).astype(np.float32)
    out, relu1, logits = runner.run(calib, {"logits": keep, "conv1": drop4},
                                    extra_outputs=["/relu1/Relu_output_0", "logits"])
    np.testing.assert_array_equal(out, ref * keep)  # the graph output reads the masked value
    np.testing.assert_array_equal(logits, out)
    assert np.all(relu1[:, 4] == 0) and np.any(relu1[:, 5] != 0)  # extra outputs come masked


def test_per_sample_masks_equal_separate_runs(models, calib):
    """Stacking calibration copies with one mask per sample is what batches coalitions."""
    runner = MaskedRunner(models["resnet"], RESNET_SITES)
    x = calib[:32]
    rng = np.random.default_rng(0)
    masks = (rng.random((3, 32)) < 0.5).astype(np.float32)
    stacked = runner.run(np.concatenate([x] * 3), {"layer2.mid": np.repeat(masks, len(x), axis=0)})[0]
    for i in range(3):
        single = runner.run(x, {"layer2.mid": masks[i]})[0]
        np.testing.assert_allclose(stacked[i * 32 : (i + 1) * 32], single, rtol=1e-5, atol=1e-5)


def test_runner_rejects_bad_input(models):
    with pytest.raises(ValueError, match="no value"):
        MaskedRunner(models["lenet"], [MaskSite("x", 16, ["nope"])])
    runner = MaskedRunner(models["lenet"], LENET_SITES[:1])
    with pytest.raises(ValueError, match="mask of site"):
        runner.run(np.zeros((2, 1, 8, 8), np.float32), {"conv1": np.ones(15)})
    with pytest.raises(ValueError, match="unknown mask sites"):
        runner.run(np.zeros((2, 1, 8, 8), np.float32), {"fc9": np.ones(3)})


# ---------------------------------------------------------------------------- activation importance


def test_activation_importance_of_a_zeroed_filter_is_zero(models, calib):
    def zero3(a):
        a[3] = 0
        return a

    proto = _edited(models["lenet"], {"conv1.weight": zero3, "conv1.bias": zero3})
    imp = activation_importance(proto, LENET_SITES[:2], calib)
    assert imp["conv1"].shape == (16,) and imp["conv2"].shape == (32,)
    assert imp["conv1"][3] == 0.0
    original = activation_importance(models["lenet"], LENET_SITES[:1], calib)["conv1"]
    assert original[3] > 0
    alive = original > 0  # (channel 6 of the sample LeNet never fires on the calibration data)
    alive[3] = False
    np.testing.assert_array_equal(imp["conv1"][alive], original[alive])


def test_activation_importance_is_mean_abs_summed_over_values(models, calib):
    site = _site("stream32")
    imp = activation_importance(models["resnet"], [site], calib)["stream32"]
    runner = MaskedRunner(models["resnet"], [])
    values = runner.run(calib, extra_outputs=site.values)[1:]
    expected = sum(np.abs(v).mean(axis=(0, 2, 3), dtype=np.float64) for v in values)
    np.testing.assert_allclose(imp, expected, rtol=1e-5)


# ---------------------------------------------------------------------------- Shapley importance


def test_shapley_is_deterministic_for_a_seed(models, calib):
    sites = [_site("conv1")]
    a = shapley_importance(models["lenet"], sites, calib, permutations=4, seed=7)
    b = shapley_importance(models["lenet"], sites, calib, permutations=4, seed=7)
    c = shapley_importance(models["lenet"], sites, calib, permutations=4, seed=8)
    np.testing.assert_array_equal(a["conv1"], b["conv1"])
    assert not np.array_equal(a["conv1"], c["conv1"])
    # a site's values do not depend on which other sites are estimated alongside it
    d = shapley_importance(models["lenet"], LENET_SITES[:2], calib, permutations=4, seed=7)
    np.testing.assert_allclose(d["conv1"], a["conv1"], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize(("name", "site", "permutations"), [("lenet", "conv1", 6), ("resnet", "layer3.mid", 4),
                                                            ("resnet", "stream16", 4)])
def test_shapley_efficiency(models, calib, name, site, permutations):
    """Shapley values sum to v(all) - v(empty) = D(empty): distortion with the whole site masked."""
    site = _site(site)
    runner = MaskedRunner(models[name], [site])
    d_empty = _distortion(runner, calib, {site.name: np.zeros(site.size)})
    exact = shapley_importance(models[name], [site], calib, permutations, seed=0, truncation=0.0)[site.name]
    assert exact.sum() == pytest.approx(d_empty, rel=1e-5)
    truncated = shapley_importance(models[name], [site], calib, permutations, seed=0, truncation=0.05)[site.name]
    assert abs(truncated.sum() - d_empty) <= 0.05 * d_empty + 1e-9
    kl = shapley_importance(models[name], [site], calib, permutations, seed=0, truncation=0.0, metric="kl")[site.name]
    assert kl.sum() > 0 and np.corrcoef(kl, exact)[0, 1] > 0.5


def test_shapley_of_a_useless_channel_is_zero(models, calib):
    def cut5(w):
        w[:, 5] = 0  # conv2 no longer reads channel 5 of conv1
        return w

    proto = _edited(models["lenet"], {"conv2.weight": cut5})
    phi = shapley_importance(proto, [_site("conv1")], calib, permutations=8, seed=1)["conv1"]
    assert abs(phi[5]) <= 1e-9 * np.abs(phi).sum()
    original = shapley_importance(models["lenet"], [_site("conv1")], calib, permutations=8, seed=1)["conv1"]
    assert original[5] > 0.05 * original.max()

    def cut_l3(w):
        w[:, [0, 7]] = 0
        return w

    proto = _edited(models["resnet"], {"layer3.conv2.weight": cut_l3})
    phi = shapley_importance(proto, [_site("layer3.mid")], calib[:128], permutations=2, seed=1)["layer3.mid"]
    assert np.all(np.abs(phi[[0, 7]]) <= 1e-9 * np.abs(phi).sum())


def test_restricted_shapley_reaches_every_channel_and_ignores_useless_ones(models, calib):
    def cut5(w):
        w[:, 5] = 0
        return w

    proto = _edited(models["lenet"], {"conv2.weight": cut5})
    phi = shapley_importance(proto, [_site("conv1")], calib, permutations=16, seed=3, min_kept_fraction=0.5)["conv1"]
    again = shapley_importance(proto, [_site("conv1")], calib, permutations=16, seed=3, min_kept_fraction=0.5)["conv1"]
    np.testing.assert_array_equal(phi, again)
    assert np.isfinite(phi).all() and phi.shape == (16,)
    assert abs(phi[5]) <= 1e-9 * np.abs(phi).sum()
    assert np.argsort(phi)[0] == 5 or phi[5] <= np.sort(phi)[1]


# ---------------------------------------------------------------------------- allocation


def test_sensitivity_allocation_removes_exactly_the_target(models, calib):
    # plus a one-channel site on the model input itself: it must never lose its channel
    sites = RESNET_SITES[:3] + [MaskSite("input", 1, ["input"])]
    scores = activation_importance(models["resnet"], sites, calib)
    total = sum(s.size for s in sites)
    for sparsity in (0.0, 0.13, 0.5, 0.9):
        alloc = sensitivity_allocation(models["resnet"], sites, scores, calib, sparsity)
        assert set(alloc) == {s.name for s in sites}
        assert sum(alloc.values()) == round(sparsity * total)
        assert all(0 <= alloc[s.name] <= s.size - 1 for s in sites)
        assert alloc["input"] == 0
    with pytest.raises(ValueError, match="keeping one per site"):
        sensitivity_allocation(models["resnet"], sites, scores, calib, 0.99)


def test_sensitivity_allocation_spares_the_site_that_matters_more(models, calib):
    """Scaling the conv that reads a site by 10 makes that site's channels matter more: it must
    lose fewer channels than before, and fewer (as a fraction) than the other site."""
    sites = [_site("layer2.mid"), _site("layer3.mid")]

    def times10(w):
        return w * 10

    def alloc(proto):
        return sensitivity_allocation(proto, sites, activation_importance(proto, sites, calib), calib, 0.5)

    base = alloc(models["resnet"])
    strong2 = alloc(_edited(models["resnet"], {"layer2.conv2.weight": times10}))
    strong3 = alloc(_edited(models["resnet"], {"layer3.conv2.weight": times10}))
    print(f"\nallocation at 50%: base {base}, layer2 x10 {strong2}, layer3 x10 {strong3}")
    assert strong2["layer2.mid"] < base["layer2.mid"] and strong2["layer2.mid"] / 32 < strong2["layer3.mid"] / 48
    assert strong3["layer3.mid"] < base["layer3.mid"] and strong3["layer3.mid"] / 48 < strong3["layer2.mid"] / 32
    # per parameter: a site whose channels carry many parameters is cut first
    heavy = sensitivity_allocation(models["resnet"], sites, activation_importance(models["resnet"], sites, calib),
                                   calib, 0.5, channel_params={"layer2.mid": 1.0, "layer3.mid": 1000.0})
    assert heavy == {"layer2.mid": 0, "layer3.mid": 40}


# ---------------------------------------------------------------------------- experiment


# ---------------------------------------------------------------------------- robustness


def test_masked_model_is_valid_onnx(models):
    for name in ("lenet", "resnet"):
        onnx.checker.check_model(MaskedRunner(models[name], SITES[name]).proto, full_check=True)


def test_unknown_ranks_are_handled_at_run_time(models, calib, monkeypatch):
    """Without shape information the [1, C, 1, ...] broadcast shape is built inside the graph."""
    import nnc_tool.prune.importance as importance

    known = MaskedRunner(models["resnet"], RESNET_SITES)
    monkeypatch.setattr(importance, "_value_types", lambda proto: {})
    blind = MaskedRunner(models["resnet"], RESNET_SITES)
    assert any(n.op_type == "ConstantOfShape" for n in blind.proto.graph.node)
    masks = {s.name: (np.arange(s.size) % 2).astype(np.float32) for s in RESNET_SITES}
    np.testing.assert_allclose(blind.run(calib, masks)[0], known.run(calib, masks)[0], rtol=1e-5, atol=1e-5)


def test_fixed_batch_models_run_in_chunks(models, calib):
    fixed = onnx.ModelProto()
    fixed.CopyFrom(models["lenet"])
    fixed.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 8
    x = calib[:36]  # not a multiple of 8: the last chunk is padded
    site = _site("conv1")
    runner = MaskedRunner(fixed, [site])
    mask = (np.arange(16) % 3 != 0).astype(np.float32)
    expected = MaskedRunner(models["lenet"], [site]).run(x, {"conv1": mask})[0]
    np.testing.assert_allclose(runner.run(x, {"conv1": mask})[0], expected, rtol=1e-6, atol=1e-6)
    a = shapley_importance(fixed, [site], x, permutations=2, seed=3)["conv1"]
    b = shapley_importance(models["lenet"], [site], x, permutations=2, seed=3)["conv1"]
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)
