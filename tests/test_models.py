import os
import socket
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torchvision import models as tvm

from stpp_ray.models import (
    BACKBONES,
    DistributedBatchNorm2d,
    build_backbone,
    build_model,
    convert_batchnorm_for_distributed,
    load_backbone_weights,
    split_parameters,
)

FAST_BACKBONES = ("resnet18", "mobilenet_v3_large", "tiny")


@pytest.mark.parametrize("output_stride", [16, 8])
@pytest.mark.parametrize("backbone", FAST_BACKBONES)
def test_output_shape_train_mode(backbone, output_stride):
    model = build_model("deeplabv3plus", backbone, 5, output_stride=output_stride, aspp_channels=32)
    x = torch.randn(2, 3, 64, 64)
    low, high = model.backbone(x)
    assert low.shape[-1] == 16 and high.shape[-1] == 64 // output_stride
    out = model(x)
    assert out.shape == (2, 5, 64, 64)
    out.mean().backward()


@pytest.mark.parametrize("output_stride", [16, 8])
@pytest.mark.parametrize("backbone", ["resnet50", "resnet101"])
def test_output_shape_large_backbones(backbone, output_stride):
    model = build_model("deeplabv3plus", backbone, 5, output_stride=output_stride, aspp_channels=16).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.inference_mode():
        low, high = model.backbone(x)
        out = model(x)
    assert low.shape[-2:] == (8, 8) and high.shape[-2:] == (32 // output_stride,) * 2
    assert out.shape == (1, 5, 32, 32)


def test_non_divisible_input_and_batch_size_one():
    model = build_model("deeplabv3plus", "resnet18", 3, aspp_channels=16).train()
    out = model(torch.randn(2, 3, 50, 70))
    assert out.shape == (2, 3, 50, 70)
    out.sum().backward()
    # The ASPP pooling branch's BatchNorm (as both references) needs 2+ images in training
    # (the config refuses runs where it would see one); inference takes single images.
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        model(torch.randn(1, 3, 50, 70))
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 50, 70)).shape == (1, 3, 50, 70)


def test_unknown_names_raise():
    with pytest.raises(ValueError, match="deeplabv3plus"):
        build_model("pspnet", "resnet18", 5)
    with pytest.raises(ValueError, match="mobilenet_v3_large"):
        build_model("deeplabv3plus", "vgg16", 5)
    with pytest.raises(ValueError, match="output_stride"):
        build_model("deeplabv3plus", "resnet18", 5, output_stride=32)
    assert set(BACKBONES) == {"resnet18", "resnet50", "resnet101", "mobilenet_v3_large", "tiny"}


@pytest.mark.parametrize("backbone", FAST_BACKBONES)
def test_split_parameters_partitions_all_parameters(backbone):
    model = build_model("deeplabv3plus", backbone, 5, aspp_channels=16)
    bb, head = split_parameters(model)
    ids = [id(p) for p in bb + head]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in model.parameters()}
    assert {id(p) for p in bb} == {id(p) for p in model.backbone.parameters()}
    assert id(model.classifier.weight) in {id(p) for p in head}

    class Wrapper(nn.Module):  # stands in for DistributedDataParallel
        def __init__(self, module):
            super().__init__()
            self.module = module

    assert [id(p) for p in split_parameters(Wrapper(model))[0]] == [id(p) for p in bb]


def test_resnet18_dilation_keeps_weight_shapes():
    plain = tvm.resnet18().state_dict()
    for os_ in (8, 16):
        dilated = build_backbone("resnet18", os_).state_dict()
        assert {k: v.shape for k, v in dilated.items()} == {
            k: v.shape for k, v in plain.items() if not k.startswith("fc.")
        }


def test_load_local_backbone_state_dict(tmp_path):
    torch.manual_seed(1)
    net = tvm.resnet18()
    path = tmp_path / "r18.pth"
    torch.save(net.state_dict(), path)  # classification checkpoint: includes fc.*
    model = build_model("deeplabv3plus", "resnet18", 5, output_stride=8, pretrained=str(path))
    got = model.backbone.state_dict()
    for key, value in net.state_dict().items():
        if not key.startswith("fc."):
            assert torch.equal(got[key], value), key

    wrapped = tmp_path / "wrapped.pth"
    torch.save({"state_dict": {"module." + k: v for k, v in net.state_dict().items()}}, wrapped)
    fresh = build_backbone("resnet18")
    load_backbone_weights(fresh, str(wrapped), "resnet18")
    assert torch.equal(fresh.layer4[1].conv2.weight, net.layer4[1].conv2.weight)


def test_load_wrong_architecture_raises(tmp_path):
    wrong = tmp_path / "mobilenet.pth"
    torch.save(tvm.mobilenet_v3_large().state_dict(), wrong)
    with pytest.raises(ValueError, match="mobilenet.pth"):
        build_model("deeplabv3plus", "resnet18", 5, pretrained=str(wrong))

    state = tvm.resnet18().state_dict()
    state["layer1.0.conv1.weight"] = torch.zeros(64, 64, 1, 1)
    del state["layer4.1.bn2.bias"]
    bad = tmp_path / "bad.pth"
    torch.save({"model": state}, bad)
    with pytest.raises(ValueError, match="bad.pth") as info:
        load_backbone_weights(build_backbone("resnet18"), str(bad), "resnet18")
    assert "layer1.0.conv1.weight" in str(info.value) and "layer4.1.bn2.bias" in str(info.value)


def test_missing_weights_file(tmp_path):
    path = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        build_model("deeplabv3plus", "resnet18", 5, pretrained=str(path))


# ----------------------------------------------------------------------- batch norm

C = 4


def _bn_pair():
    torch.manual_seed(3)
    ref = nn.BatchNorm2d(C, momentum=0.3)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
        ref.bias.uniform_(-0.5, 0.5)
    ours = DistributedBatchNorm2d(C, momentum=0.3)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def _batches():
    g = torch.Generator().manual_seed(7)
    return [(torch.randn(6, C, 5, 3, generator=g) * 3 + 2, torch.randn(6, C, 5, 3, generator=g)) for _ in range(2)]


def _run_bn(bn, batches, rank=0, world=1):
    """Two training steps; returns outputs, input grads and parameter grads per step."""
    results = []
    for x, w in batches:
        x = x.chunk(world)[rank].clone().requires_grad_()
        bn.zero_grad()
        y = bn(x)
        (y * w.chunk(world)[rank]).sum().backward()
        results.append((y.detach(), x.grad, bn.weight.grad.clone(), bn.bias.grad.clone()))
    return results


def _assert_stats_equal(a, b):
    assert torch.allclose(a.running_mean, b.running_mean, atol=1e-5)
    assert torch.allclose(a.running_var, b.running_var, atol=1e-5)
    assert int(a.num_batches_tracked) == int(b.num_batches_tracked)


def test_distributed_bn_without_process_group_equals_batchnorm():
    ref, ours = _bn_pair()
    for r, o in zip(_run_bn(ref, _batches()), _run_bn(ours, _batches())):
        for a, b in zip(r, o):
            assert torch.allclose(a, b, atol=1e-5)
    _assert_stats_equal(ref, ours)
    x = torch.randn(3, C, 2, 2)
    assert torch.allclose(ref.eval()(x), ours.eval()(x), atol=1e-6)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bn_worker(rank, world, port, out_dir):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        _, ours = _bn_pair()
        results = _run_bn(ours, _batches(), rank, world)
        stats = {k: v for k, v in ours.state_dict().items() if k.startswith(("running", "num_batches"))}
        torch.save({"results": results, "stats": stats}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.multiprocess
def test_distributed_bn_two_gloo_ranks_equal_full_batch(tmp_path):
    world = 2
    mp.spawn(_bn_worker, args=(world, _free_port(), str(tmp_path)), nprocs=world, join=True)
    ref, _ = _bn_pair()
    expected = _run_bn(ref, _batches())
    per_rank = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world)]
    for step, (y, gx, gw, gb) in enumerate(expected):
        got = [p["results"][step] for p in per_rank]
        assert torch.allclose(torch.cat([g[0] for g in got]), y, atol=1e-5)
        assert torch.allclose(torch.cat([g[1] for g in got]), gx, atol=1e-5)
        # each rank holds the gradient of its own loss term; their sum is the full gradient
        assert torch.allclose(sum(g[2] for g in got), gw, atol=1e-4)
        assert torch.allclose(sum(g[3] for g in got), gb, atol=1e-4)
    for p in per_rank:
        _assert_stats_equal(ref, SimpleNamespace(**p["stats"]))


def test_convert_batchnorm_for_distributed():
    model = build_model("deeplabv3plus", "mobilenet_v3_large", 3, aspp_channels=16).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
    n_bn = sum(type(m) is nn.BatchNorm2d for m in model.modules())
    params = [id(p) for p in model.parameters()]
    converted = convert_batchnorm_for_distributed(model, "cpu")
    assert sum(type(m) is DistributedBatchNorm2d for m in converted.modules()) == n_bn
    assert not any(type(m) is nn.BatchNorm2d for m in converted.modules())
    assert [id(p) for p in converted.parameters()] == params  # an existing optimizer stays valid
    with torch.no_grad():
        assert torch.allclose(converted(x), before, atol=1e-5)

    sync = convert_batchnorm_for_distributed(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)), "cuda")
    assert isinstance(sync[1], nn.SyncBatchNorm)
    with pytest.raises(ValueError, match="device_type"):
        convert_batchnorm_for_distributed(model, "tpu")


# ----------------------------------------------------------------------- reference heads


def _atrous_dilations(model) -> list[int]:
    return [b[0].dilation[0] for b in model.aspp.branches if isinstance(b, nn.Sequential) and b[0].kernel_size == (3, 3)]


@pytest.mark.parametrize("backbone", ["tiny", "resnet18"])
def test_aspp_rates_follow_the_output_stride(backbone):
    """ST++: stride 8 with rates (12, 24, 36); UniMatch's configs: stride 16 with (6, 12, 18)."""
    for output_stride, rates in ((8, [12, 24, 36]), (16, [6, 12, 18])):
        model = build_model("deeplabv3plus", backbone, 3, output_stride=output_stride, aspp_channels=8)
        assert _atrous_dilations(model) == rates
        assert [b[0].padding[0] for b in model.aspp.branches[1:4]] == rates  # same size out
        assert model.backbone(torch.randn(1, 3, 32, 32))[1].shape[-1] == 32 // output_stride


def _dropouts(module) -> list[tuple[str, float]]:
    return [(type(m).__name__, m.p) for m in module.modules() if isinstance(m, nn.modules.dropout._DropoutNd)]


def test_heads_are_built_as_their_references():
    """LiheYoung/ST-PlusPlus model/semseg/deeplabv3plus.py: BatchNorm in the pooling branch,
    Dropout2d(0.5) after the ASPP projection, Dropout(0.1) after the fuse convs.
    LiheYoung/UniMatch model/semseg/deeplabv3plus.py: the same without any dropout."""
    stpp = build_model("deeplabv3plus", "tiny", 3, aspp_channels=8, head="stpp")
    unimatch = build_model("deeplabv3plus", "tiny", 3, aspp_channels=8, head="unimatch")
    for model in (stpp, unimatch):
        pooling = model.aspp.branches[-1]
        assert [type(m) for m in pooling.conv] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU]
        assert pooling.conv[0].bias is None
    assert _dropouts(stpp.aspp) == [("Dropout2d", 0.5)] and isinstance(stpp.aspp.project[-1], nn.Dropout2d)
    assert _dropouts(stpp.fuse) == [("Dropout", 0.1)] and isinstance(stpp.fuse[-1], nn.Dropout)
    assert _dropouts(stpp) == [("Dropout2d", 0.5), ("Dropout", 0.1)]
    assert _dropouts(unimatch) == []
    # Same parameters: the heads differ only in training.
    assert {k: v.shape for k, v in stpp.state_dict().items()} == {k: v.shape for k, v in unimatch.state_dict().items()}
    with pytest.raises(ValueError, match="unknown head"):
        build_model("deeplabv3plus", "tiny", 3, head="pspnet")


def test_every_resize_aligns_corners():
    """Both references resize with align_corners=True: the ASPP output to the low-level size
    and the logits to the input size."""
    torch.manual_seed(0)
    model = build_model("deeplabv3plus", "tiny", 3, output_stride=16, aspp_channels=8).eval()
    seen = {}
    model.aspp.register_forward_hook(lambda m, i, o: seen.update(aspp=o))
    model.fuse.register_forward_hook(lambda m, i, o: seen.update(fuse_in=i[0]))
    model.classifier.register_forward_hook(lambda m, i, o: seen.update(logits=o))
    x = torch.randn(2, 3, 37, 45)
    with torch.no_grad():
        out = model(x)
        low_size = seen["fuse_in"].shape[-2:]
        for align, check in ((True, torch.testing.assert_close), (False, None)):
            up = F.interpolate(seen["aspp"], size=low_size, mode="bilinear", align_corners=align)
            final = F.interpolate(seen["logits"], size=x.shape[-2:], mode="bilinear", align_corners=align)
            if check:
                check(seen["fuse_in"][:, 48:], up)  # decoder input: [low-level 48, ASPP]
                check(out, final)
            else:
                assert not torch.allclose(seen["fuse_in"][:, 48:], up) and not torch.allclose(out, final)


def test_weight_file_records_and_rebuilds_the_head(tmp_path):
    from stpp_ray.weights import CheckpointError, architecture, load_model, save_weights
    from stpp_ray.config import load_config

    cfg = load_config(None, ["method=unimatch", "model.backbone=tiny", "model.aspp_channels=8", "model.output_stride=8"])
    arch = architecture(cfg.model, 3)
    assert arch["head"] == "unimatch"
    torch.manual_seed(0)
    model = build_model("deeplabv3plus", "tiny", 3, output_stride=8, aspp_channels=8, head="unimatch")
    save_weights(tmp_path / "w.pt", model, arch)
    loaded, blob = load_model(tmp_path / "w.pt", expect_arch=arch)
    assert blob["arch"]["head"] == "unimatch" and loaded.head_name == "unimatch" and _dropouts(loaded) == []
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    with pytest.raises(CheckpointError, match="head: file has 'unimatch', config wants 'stpp'"):
        load_model(tmp_path / "w.pt", expect_arch={**arch, "head": "stpp"})
    # A record without the key (written before it existed) means ST++'s head.
    old = {k: v for k, v in arch.items() if k != "head"}
    save_weights(tmp_path / "old.pt", build_model("deeplabv3plus", "tiny", 3, output_stride=8, aspp_channels=8), old)
    assert load_model(tmp_path / "old.pt", expect_arch=old)[0].head_name == "stpp"
