"""Tests of the architectures: the MDEQ's protocol parts against a functional restatement of the papers'
network, parameter counts, per-example independence, dropout and init semantics, paper-checkpoint key
conversion, and the RobustBench baselines against RobustBench's own definitions."""

from __future__ import annotations

import contextlib
import importlib.util
from dataclasses import replace
from pathlib import Path
from types import ModuleType

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bench.errors import BenchError
from models.deq import DeployConfig, DEQClassifier, flat_size
from models.factory import ARCHITECTURES, build_architecture
from models.mdeq import (
    MDEQ,
    MDEQ_LARGE,
    MDEQ_TEST,
    MDEQ_TINY,
    MDEQ_XL,
    MDEQConfig,
    mdeq_config_from_dict,
)
from models.paper_keys import convert_key, convert_paper_state_dict
from models.resnet import ResNet18
from models.small import TinyCNN, small_resnet
from models.wrn import WRN34_10, WideResNet

# Three branches at power-of-two sizes: stage0 exists, fusion has a two-step downsample chain and a x4
# upsample, and nearest upsampling can be restated as repeat_interleave.
THREE_BRANCH = MDEQConfig(
    in_channels=3,
    image_size=16,
    num_classes=10,
    channels=(4, 8, 8),
    head_channels=(2, 4, 4),
    final_chansize=12,
    num_groups=2,
)
# Odd sizes 10 -> 5 -> 3: the ceil-halving and interpolate-to-size path.
ODD_SIZES = replace(THREE_BRANCH, image_size=10)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def randomise_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random parameters and BN running stats, so no zero/one init hides a wrong wiring."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point():
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=gen) + 0.5)
            else:
                t.copy_(torch.randn(t.shape, generator=gen) * 0.3)
    return model


def normed_weight(conv: nn.Conv2d) -> Tensor:
    """g * v / ||v|| from the parametrization's stored tensors (norm over all dims but the output one)."""
    g = conv.parametrizations.weight.original0
    v = conv.parametrizations.weight.original1
    return g * v / v.flatten(1).norm(dim=1).view(-1, 1, 1, 1)


# ----- a functional restatement of the papers' network ----------------------------------------------


def reference_f(model: MDEQ, zs: list[Tensor], u: Tensor) -> list[Tensor]:
    cfg = model.config
    groups = cfg.num_groups
    stage = model.fullstage
    blocks = []
    for i, z in enumerate(zs):
        blk = stage.branches[i].blocks[0]
        h = F.conv2d(z, normed_weight(blk.conv1), padding=1)
        h = F.relu(F.group_norm(h, groups, blk.gn1.weight, blk.gn1.bias))
        h = F.conv2d(h, normed_weight(blk.conv2), padding=1)
        if i == 0:
            h = h + u
        h = F.group_norm(h, groups, blk.gn2.weight, blk.gn2.bias) + z
        blocks.append(F.group_norm(F.relu(h), groups, blk.gn3.weight, blk.gn3.bias))
    out = []
    for i in range(len(zs)):
        y = blocks[i]
        for j in range(len(zs)):
            layer = stage.fuse_layers[i][j] if i != j else None
            if j > i:
                t = F.conv2d(blocks[j], layer.net.conv.weight)
                t = F.group_norm(t, groups, layer.net.gnorm.weight, layer.net.gnorm.bias)
                scale = 2 ** (j - i)
                y = y + t.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)
            elif j < i:
                t = blocks[j]
                for k in range(i - j):
                    step = layer.net[k]
                    t = F.conv2d(t, step.conv.weight, stride=2, padding=1)
                    t = F.group_norm(t, groups, step.gnorm.weight, step.gnorm.bias)
                    if k < i - j - 1:
                        t = F.relu(t)
                y = y + t
        post = stage.post_fuse_layers[i]
        out.append(F.group_norm(F.conv2d(F.relu(y), normed_weight(post.conv)), groups // 2))
    return out


def eval_bn(x: Tensor, bn: nn.BatchNorm2d) -> Tensor:
    return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)


def reference_head(model: MDEQ, zs: list[Tensor]) -> Tensor:
    def bottleneck(x: Tensor, b: nn.Module) -> Tensor:
        assert b.bn1.weight is None and b.bn2.weight is None and b.bn3.weight is None  # affine=False
        h = F.relu(eval_bn(F.conv2d(x, b.conv1.weight), b.bn1))
        h = F.relu(eval_bn(F.conv2d(h, b.conv2.weight, padding=1), b.bn2))
        h = eval_bn(F.conv2d(h, b.conv3.weight), b.bn3)
        return F.relu(h + eval_bn(F.conv2d(x, b.downsample[0].weight), b.downsample[1]))

    y = bottleneck(zs[0], model.incre_modules[0][0])
    for i, down in enumerate(model.downsamp_modules):
        d = F.relu(eval_bn(F.conv2d(y, down[0].weight, down[0].bias, stride=2, padding=1), down[1]))
        y = bottleneck(zs[i + 1], model.incre_modules[i + 1][0]) + d
    conv, bn = model.final_layer[0], model.final_layer[1]
    y = F.relu(eval_bn(F.conv2d(y, conv.weight, conv.bias), bn))
    return F.linear(y.mean(dim=(2, 3)), model.classifier.weight, model.classifier.bias)


def reference_inject(model: MDEQ, x: Tensor) -> Tensor:
    s = model.downsample
    h = F.relu(eval_bn(F.conv2d(x, s[0].weight, padding=1), s[1]))
    h = F.relu(eval_bn(F.conv2d(h, s[3].weight, padding=1), s[4]))
    return F.relu(eval_bn(F.conv2d(h, model.stage0[0].weight), model.stage0[1]))


def test_f_head_inject_match_functional_restatement_of_the_papers_network() -> None:
    torch.manual_seed(0)
    model = randomise_(MDEQ(THREE_BRANCH)).eval()
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        u = model.inject(x)
        torch.testing.assert_close(u, reference_inject(model, x), atol=1e-5, rtol=1e-5)
        z = torch.randn(2, model.state_size)
        zs = model.split_state(z)
        expected = torch.cat([t.flatten(1) for t in reference_f(model, zs, u)], dim=1)
        torch.testing.assert_close(model.f(z, u), expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model.head(z), reference_head(model, zs), atol=1e-5, rtol=1e-5)


def test_state_layout_is_branches_flattened_in_order() -> None:
    model = MDEQ(THREE_BRANCH)
    shapes = [(4, 16, 16), (8, 8, 8), (8, 4, 4)]
    assert THREE_BRANCH.branch_shapes() == shapes
    assert model.state_size == flat_size([torch.Size(s) for s in shapes])
    z = torch.arange(2 * model.state_size, dtype=torch.float32).view(2, -1)
    parts = model.split_state(z)
    assert [tuple(p.shape[1:]) for p in parts] == shapes
    assert parts[1][1, 0, 0, 0] == z[1, 4 * 16 * 16]
    torch.testing.assert_close(model.join_state(parts), z)
    u = model.inject(torch.rand(2, 3, 16, 16))
    assert u.shape == (2, 4, 16, 16)
    z0 = model.init_state(u)
    assert z0.shape == (2, model.state_size) and not z0.any()


def test_injection_reaches_branch_zero_only() -> None:
    model = randomise_(MDEQ(THREE_BRANCH)).eval()
    z = torch.randn(1, model.state_size)
    u = torch.randn(1, 4, 16, 16)
    block_outputs: dict[int, list[Tensor]] = {0: [], 1: [], 2: []}
    for i, branch in enumerate(model.fullstage.branches):
        branch.register_forward_hook(lambda _m, _a, out, i=i: block_outputs[i].append(out))
    with torch.no_grad():
        model.f(z, u)
        model.f(z, torch.zeros_like(u))
    assert not torch.allclose(*block_outputs[0])
    assert torch.equal(*block_outputs[1]) and torch.equal(*block_outputs[2])


@pytest.mark.parametrize("config", [MDEQ_TEST, THREE_BRANCH, ODD_SIZES, MDEQ_TINY])
@pytest.mark.parametrize(("dtype", "atol"), [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_eval_mode_examples_are_independent_of_the_batch(
    config: MDEQConfig, dtype: torch.dtype, atol: float
) -> None:
    """Float64 shows there is no mixing at all; float32 differs by a few ulps only because CPU conv kernels
    round differently for different batch sizes (below 1e-6 for MDEQ_TEST, up to ~7e-6 on states of
    magnitude ~7 for the three-branch configs)."""
    torch.manual_seed(1)
    model = randomise_(MDEQ(config), seed=2).eval().to(dtype)
    x = torch.rand(3, config.in_channels, config.image_size, config.image_size, dtype=dtype)
    with torch.no_grad():
        model.begin_forward(3)
        u = model.inject(x)
        z2 = model.f(model.f(model.init_state(u), u), u)
        logits = model.head(z2)
        for k in range(3):
            model.begin_forward(1)
            uk = model.inject(x[k : k + 1])
            z2k = model.f(model.f(model.init_state(uk), uk), uk)
            torch.testing.assert_close(uk, u[k : k + 1], atol=atol, rtol=0)
            torch.testing.assert_close(z2k, z2[k : k + 1], atol=atol, rtol=0)
            torch.testing.assert_close(model.head(z2k), logits[k : k + 1], atol=atol, rtol=0)


def test_odd_sizes_use_ceil_halving() -> None:
    assert ODD_SIZES.branch_shapes() == [(4, 10, 10), (8, 5, 5), (8, 3, 3)]
    assert MDEQ_TINY.branch_shapes() == [(8, 14, 14), (16, 7, 7), (32, 4, 4)]
    model = MDEQ(ODD_SIZES).eval()
    u = model.inject(torch.rand(2, 3, 10, 10))
    z = model.f(model.init_state(u), u)
    assert z.shape == (2, model.state_size) and torch.isfinite(z).all()


def test_single_branch_skips_fusion_and_post_fuse_as_the_papers_code_does() -> None:
    config = replace(MDEQ_TEST, channels=(4,), head_channels=(2,))
    model = randomise_(MDEQ(config)).eval()
    assert model.stage0 is None and model.fullstage.fuse_layers is None
    z = torch.randn(2, model.state_size)
    u = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        block_only = model.fullstage.branches[0](model.split_state(z)[0], u).flatten(1)
        torch.testing.assert_close(model.f(z, u), block_only)
    assert model.head(z).shape == (2, 10)


def test_stage0_exists_only_for_more_than_two_branches_or_a_strided_stem() -> None:
    assert MDEQ(MDEQ_TEST).stage0 is None
    assert MDEQ(THREE_BRANCH).stage0 is not None
    assert MDEQ(replace(MDEQ_TEST, downsample_times=1)).stage0 is not None


def test_variational_dropout_mask_is_per_sample_channel_and_shared_within_a_forward() -> None:
    torch.manual_seed(3)
    config = replace(THREE_BRANCH, dropout=0.5)
    model = randomise_(MDEQ(config)).train()
    u = torch.randn(4, 4, 16, 16)
    z = torch.randn(4, model.state_size)
    with pytest.raises(RuntimeError, match="begin_forward"):
        model.f(z, u)
    model.begin_forward(4)
    for drop, c in zip(model.fullstage.dropouts(), config.channels, strict=True):
        assert drop.mask.shape == (4, c, 1, 1)
        assert set(drop.mask.unique().tolist()) <= {0.0, 2.0}
    first, again = model.f(z, u), model.f(z, u)
    torch.testing.assert_close(first, again)  # one mask for every f call of the forward
    model.begin_forward(4)
    assert not torch.allclose(model.f(z, u), first)  # a new forward draws a new mask
    model.eval()
    model.begin_forward(4)
    assert all(d.mask is None for d in model.fullstage.dropouts())
    with torch.no_grad():
        plain = model.f(z, u)
        model.fullstage.dropouts()[0].p = 0.0
        torch.testing.assert_close(model.f(z, u), plain)  # eval mode ignores dropout


def test_unrolled_pretrain_forward_is_the_weight_tied_unroll_with_full_backprop() -> None:
    torch.manual_seed(4)
    model = MDEQ(MDEQ_TEST).eval()
    x = torch.rand(2, 3, 8, 8, requires_grad=True)
    logits = model.unrolled_pretrain_forward(x, layers=3)
    u = model.inject(x)
    z = model.init_state(u)
    for _ in range(3):
        z = model.f(z, u)
    torch.testing.assert_close(logits, model.head(z))
    logits.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    g = model.fullstage.branches[0].blocks[0].conv1.parametrizations.weight.original0.grad
    assert g is not None and g.abs().sum() > 0
    assert model.unrolled_pretrain_forward(x.detach()).shape == (2, 10)  # default depth num_layers


def test_cached_weights_give_the_same_f_and_gradients() -> None:
    torch.manual_seed(9)
    model = randomise_(MDEQ(THREE_BRANCH)).eval()
    x = torch.rand(2, 3, 16, 16)
    plain = model.unrolled_pretrain_forward(x, layers=2)
    plain.sum().backward()
    v = model.fullstage.branches[2].blocks[0].conv2.parametrizations.weight.original1
    plain_grad = v.grad.clone()
    v.grad = None
    with model.weights_cached():
        cached = model.unrolled_pretrain_forward(x, layers=2)
        cached.sum().backward()
    torch.testing.assert_close(cached, plain)
    torch.testing.assert_close(v.grad, plain_grad)


def test_init_follows_the_papers_code() -> None:
    torch.manual_seed(5)
    model = MDEQ(MDEQ_LARGE)
    plain = model.final_layer[0]
    assert abs(plain.weight.std().item() - 0.01) < 5e-4 and abs(plain.bias.std().item() - 0.01) < 3e-3
    fuse = model.fullstage.fuse_layers[3][0].net[0].conv.weight
    assert abs(fuse.std().item() - 0.01) < 5e-4
    conv = model.fullstage.branches[0].blocks[0].conv1
    g = conv.parametrizations.weight.original0
    v = conv.parametrizations.weight.original1
    torch.testing.assert_close(g.flatten(), v.flatten(1).norm(dim=1))  # g = ||v|| at init
    fan_in = v[0].numel()
    assert abs(v.std().item() - (1 / fan_in) ** 0.5 / 3**0.5) < 2e-3  # PyTorch default, not N(0, 0.01)
    bn = model.downsample[1]
    assert torch.equal(bn.weight, torch.ones_like(bn.weight)) and not bn.bias.any()


def test_parameter_counts() -> None:
    assert n_params(MDEQ(MDEQ_LARGE)) == 11_097_438
    assert n_params(MDEQ(MDEQ_XL)) == 48_792_098
    assert n_params(MDEQ(MDEQ_TINY)) == 175_162
    assert n_params(ResNet18()) == 11_173_962
    assert n_params(WRN34_10()) == 46_160_474
    assert n_params(small_resnet()) == 174_970


def test_mdeq_is_a_deq_classifier_with_a_deploy_config() -> None:
    deploy = DeployConfig(max_iter=30)
    model = MDEQ(MDEQ_TEST, deploy=deploy)
    assert isinstance(model, DEQClassifier) and model.deploy.max_iter == 30
    assert MDEQ(MDEQ_TEST).deploy == DeployConfig()


def test_wrong_input_shape_and_bad_configs_raise_bench_error() -> None:
    model = MDEQ(MDEQ_TEST)
    with pytest.raises(BenchError, match="expects images"):
        model.inject(torch.rand(1, 1, 8, 8))
    with pytest.raises(BenchError, match="num_groups"):
        MDEQ(replace(MDEQ_TEST, num_groups=3))
    with pytest.raises(BenchError, match="head channel"):
        MDEQ(replace(MDEQ_TEST, head_channels=(2,)))
    with pytest.raises(BenchError, match="dropout"):
        MDEQ(replace(MDEQ_TEST, dropout=1.0))


# ----- paper checkpoints ---------------------------------------------------------------------------


def paper_layout(cfg: MDEQConfig) -> dict[str, tuple[int, ...]]:
    """Key -> shape of a state dict saved by the papers' MDEQ-Vision code (before DataParallel's prefix),
    written from their naming: `downsample` stem Sequential, `stage0`, `fullstage.branches.i.blocks.0`
    with WeightNorm `weight_g`/`weight_v`, `fuse_layers.i.j.net[.k].conv/gnorm`, `post_fuse_layers.i.conv`
    (non-affine GN), head `incre_modules.i.0` Bottlenecks with non-affine bn1-3, `downsamp_modules`,
    `final_layer`, `classifier`."""
    keys: dict[str, tuple[int, ...]] = {}

    def bn(prefix: str, c: int, affine: bool = True) -> None:
        if affine:
            keys[f"{prefix}.weight"] = (c,)
            keys[f"{prefix}.bias"] = (c,)
        keys[f"{prefix}.running_mean"] = (c,)
        keys[f"{prefix}.running_var"] = (c,)
        keys[f"{prefix}.num_batches_tracked"] = ()

    def gn(prefix: str, c: int) -> None:
        keys[f"{prefix}.weight"] = (c,)
        keys[f"{prefix}.bias"] = (c,)

    def wn(prefix: str, shape: tuple[int, ...]) -> None:
        keys[f"{prefix}.weight_g"] = (shape[0], 1, 1, 1)
        keys[f"{prefix}.weight_v"] = shape

    ch, hd, e = cfg.channels, cfg.head_channels, cfg.expansion
    keys["downsample.0.weight"] = (ch[0], cfg.in_channels, 3, 3)
    bn("downsample.1", ch[0])
    keys["downsample.3.weight"] = (ch[0], ch[0], 3, 3)
    bn("downsample.4", ch[0])
    if len(ch) > 2:
        keys["stage0.0.weight"] = (ch[0], ch[0], 1, 1)
        bn("stage0.1", ch[0])
    for i, c in enumerate(ch):
        p = f"fullstage.branches.{i}.blocks.0"
        wn(f"{p}.conv1", (e * c, c, 3, 3))
        gn(f"{p}.gn1", e * c)
        wn(f"{p}.conv2", (c, e * c, 3, 3))
        gn(f"{p}.gn2", c)
        gn(f"{p}.gn3", c)
        for j, cj in enumerate(ch):
            f = f"fullstage.fuse_layers.{i}.{j}.net"
            if j > i:
                keys[f"{f}.conv.weight"] = (c, cj, 1, 1)
                gn(f"{f}.gnorm", c)
            for k in range(i - j):
                out = c if k == i - j - 1 else cj
                keys[f"{f}.{k}.conv.weight"] = (out, cj, 3, 3)
                gn(f"{f}.{k}.gnorm", out)
        wn(f"fullstage.post_fuse_layers.{i}.conv", (c, c, 1, 1))
        h = f"incre_modules.{i}.0"
        keys[f"{h}.conv1.weight"] = (hd[i], c, 1, 1)
        bn(f"{h}.bn1", hd[i], affine=False)
        keys[f"{h}.conv2.weight"] = (hd[i], hd[i], 3, 3)
        bn(f"{h}.bn2", hd[i], affine=False)
        keys[f"{h}.conv3.weight"] = (4 * hd[i], hd[i], 1, 1)
        bn(f"{h}.bn3", 4 * hd[i], affine=False)
        keys[f"{h}.downsample.0.weight"] = (4 * hd[i], c, 1, 1)
        bn(f"{h}.downsample.1", 4 * hd[i])
        if i + 1 < len(ch):
            keys[f"downsamp_modules.{i}.0.weight"] = (4 * hd[i + 1], 4 * hd[i], 3, 3)
            keys[f"downsamp_modules.{i}.0.bias"] = (4 * hd[i + 1],)
            bn(f"downsamp_modules.{i}.1", 4 * hd[i + 1])
    keys["final_layer.0.weight"] = (cfg.final_chansize, 4 * hd[-1], 1, 1)
    keys["final_layer.0.bias"] = (cfg.final_chansize,)
    bn("final_layer.1", cfg.final_chansize)
    keys["classifier.weight"] = (cfg.num_classes, cfg.final_chansize)
    keys["classifier.bias"] = (cfg.num_classes,)
    return keys


@pytest.mark.parametrize("config", [MDEQ_TEST, THREE_BRANCH])
def test_paper_checkpoint_loads_strictly_and_lands_in_place(config: MDEQConfig, tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(6)
    paper = {
        name: (
            torch.randint(0, 100, shape, generator=gen)
            if name.endswith("tracked")
            else torch.randn(shape, generator=gen)
        )
        for name, shape in paper_layout(config).items()
    }
    path = tmp_path / "checkpoint.pth.tar"
    torch.save({"state_dict": {f"module.{k}": v for k, v in paper.items()}, "epoch": 3}, path)
    loaded = torch.load(path, weights_only=True)

    model = MDEQ(config)
    model.load_state_dict(convert_paper_state_dict(loaded), strict=True)

    conv = model.fullstage.branches[1].blocks[0].conv2
    g, v = (
        paper["fullstage.branches.1.blocks.0.conv2.weight_g"],
        paper["fullstage.branches.1.blocks.0.conv2.weight_v"],
    )
    expected = g * v / v.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    torch.testing.assert_close(conv.weight, expected)
    post = model.fullstage.post_fuse_layers[0].conv
    pg, pv = (
        paper["fullstage.post_fuse_layers.0.conv.weight_g"],
        paper["fullstage.post_fuse_layers.0.conv.weight_v"],
    )
    torch.testing.assert_close(post.weight, pg * pv / pv.flatten(1).norm(dim=1).view(-1, 1, 1, 1))
    assert torch.equal(
        model.fullstage.fuse_layers[0][1].net.conv.weight, paper["fullstage.fuse_layers.0.1.net.conv.weight"]
    )
    assert torch.equal(model.downsample[4].running_var, paper["downsample.4.running_var"])
    assert torch.equal(
        model.incre_modules[1][0].bn2.running_mean, paper["incre_modules.1.0.bn2.running_mean"]
    )
    assert torch.equal(model.classifier.weight, paper["classifier.weight"])


def test_convert_key_renames_and_rejects_non_state_dicts() -> None:
    assert convert_key("module.fullstage.branches.0.blocks.0.conv1.weight_g") == (
        "fullstage.branches.0.blocks.0.conv1.parametrizations.weight.original0"
    )
    assert convert_key("fullstage.post_fuse_layers.2.conv.weight_v") == (
        "fullstage.post_fuse_layers.2.conv.parametrizations.weight.original1"
    )
    assert convert_key("module.downsample.1.running_var") == "downsample.1.running_var"
    bare = {"module.classifier.bias": torch.zeros(2)}
    assert list(convert_paper_state_dict(bare)) == ["classifier.bias"]
    with pytest.raises(BenchError, match="not a tensor"):
        convert_paper_state_dict({"classifier.bias": [0.0, 1.0]})


# ----- RobustBench baselines -----------------------------------------------------------------------


def robustbench_architecture(name: str) -> ModuleType:
    """RobustBench's architecture file, loaded by path: importing the package needs pkg_resources."""
    spec = importlib.util.find_spec("robustbench")
    assert spec is not None and spec.submodule_search_locations
    path = Path(spec.submodule_search_locations[0]) / "model_zoo" / "architectures" / f"{name}.py"
    module_spec = importlib.util.spec_from_file_location(f"_robustbench_{name}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def test_resnet18_matches_robustbench_keys_and_outputs() -> None:
    theirs = robustbench_architecture("resnet").ResNet18()
    ours = ResNet18()
    assert shapes(ours) == shapes(theirs)
    randomise_(theirs, seed=7).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    ours.eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-4, rtol=1e-4)


def test_wide_resnet_matches_robustbench_keys_and_outputs() -> None:
    module = robustbench_architecture("wide_resnet")
    assert shapes(WRN34_10()) == shapes(module.WideResNet(depth=34, widen_factor=10))
    small_theirs = module.WideResNet(depth=10, widen_factor=2, sub_block1=True)
    small_ours = WideResNet(depth=10, widen_factor=2, sub_block1=True)
    assert shapes(small_ours) == shapes(small_theirs)
    randomise_(small_theirs, seed=8).eval()
    small_ours.load_state_dict(small_theirs.state_dict(), strict=True)
    small_ours.eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(small_ours(x), small_theirs(x), atol=1e-4, rtol=1e-4)


def test_small_baselines_run_on_fashion_mnist_shapes() -> None:
    x = torch.rand(2, 1, 28, 28)
    assert small_resnet()(x).shape == (2, 10)
    assert TinyCNN()(x).shape == (2, 10)


# ----- factory ---------------------------------------------------------------------------------------


def test_factory_builds_every_architecture_and_applies_mdeq_presets() -> None:
    assert set(ARCHITECTURES) >= {"mdeq", "resnet18", "wrn34-10", "small-resnet", "tiny-cnn"}
    model = build_architecture("mdeq", {"preset": "test", "dropout": 0.0, "channels": [4, 8]})
    assert isinstance(model, MDEQ) and model.config == replace(MDEQ_TEST, dropout=0.0)
    explicit = {
        "in_channels": 1,
        "image_size": 28,
        "num_classes": 10,
        "channels": [8, 16, 32],
        "head_channels": [4, 8, 16],
        "final_chansize": 128,
        "num_groups": 4,
        "downsample_times": 1,
    }
    assert mdeq_config_from_dict(explicit) == MDEQ_TINY
    assert isinstance(build_architecture("small-resnet", {}), nn.Module)
    assert isinstance(build_architecture("tiny-cnn", {"in_channels": 3}), TinyCNN)
    assert n_params(build_architecture("resnet18", {"num_classes": 10})) == 11_173_962


def test_factory_errors_are_bench_errors_naming_the_valid_choices() -> None:
    with pytest.raises(BenchError, match="valid names: mdeq, resnet18"):
        build_architecture("vgg16", {})
    with pytest.raises(BenchError, match="did you mean 'resnet18'"):
        build_architecture("resnet-18", {})
    with pytest.raises(BenchError, match="valid presets"):
        build_architecture("mdeq", {"preset": "huge"})
    with pytest.raises(BenchError, match="unknown MDEQ config keys"):
        build_architecture("mdeq", {"preset": "test", "widht": 3})
    with pytest.raises(BenchError, match="missing"):
        build_architecture("mdeq", {"channels": [4, 8]})
    with pytest.raises(BenchError, match="unknown config keys"):
        build_architecture("wrn34-10", {"depth": 28})
    with pytest.raises(BenchError, match="bad MDEQ config"):
        build_architecture("mdeq", {"preset": "test", "channels": ["four", 8]})


def test_attack_view_caches_weights_without_losing_parameter_gradients() -> None:
    """AttackView computes the weight-normed weights once per forward; x and parameter gradients agree
    with the uncached computation (the cache is filled with autograd on, so the no-grad solve inside it
    does not cut the surrogate off from the parameters)."""
    from bench.deq.view import AttackView

    torch.manual_seed(10)
    model = randomise_(MDEQ(THREE_BRANCH)).eval()
    x = torch.rand(2, 3, 16, 16)
    v = model.fullstage.branches[0].blocks[0].conv1.parametrizations.weight.original1

    def grads(view: AttackView) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        xg = x.clone().requires_grad_(True)
        v.grad = None
        out = view(xg)
        out[:, 0].sum().backward()
        return out.detach(), xg.grad, v.grad.clone()

    cached = grads(AttackView(model, "final", "state:2:1:0.5"))
    model.weights_cached = contextlib.nullcontext  # type: ignore[method-assign]
    plain = grads(AttackView(model, "final", "state:2:1:0.5"))
    assert plain[2].abs().sum() > 0
    for a, b in zip(cached, plain, strict=True):
        torch.testing.assert_close(a, b)
