"""Makes the PyTorch checkpoints that simtrans-pth's and `cargo xtask import`'s tests read.

The authors of SimTrans release their models as files of `torch.save`; this script writes tiny
files in the same layouts, with the same pickled class names, so that the Rust reader and the
import are tested against what torch really writes, without Python at test time:

- a torchvision ResNet reshaped to our `small` architecture (width 4: a 3x3 stem without
  max-pooling, one basic block per stage, widths 4/8/16/32), built from torchvision's own
  classes so that every parameter keeps torchvision's name;
- `classifier_whole.pth`: `DataParallel(Net)` of the step-3 classifier (`GCN_reg.graph_modules.Net`,
  as `GCN_reg/with_GCN.py` saves it, with the ResNet under `backbone`, 50 classes as CUB's
  novel split), with the attributes and `cuda:0`
  storage locations of a checkpoint saved from two GPUs; `classifier_params.pth` and
  `classifier_params_legacy.pth`: `Net.state_dict()` in the zip and the legacy format;
- `backbone_step0.pth` / `backbone_step0_legacy.pth`: `DataParallel(ResNet)` over 150 classes
  (CUB's base split), as step 0 saves it;
- `simnet_head4.pth`, `simnet_head2.pth`: `ad_similarity.ad_modules.GANSimilarityNet` with head
  type 4 or 2; `domain_classifier.pth`: `DataParallel(DomainClassifier)`;
- refusals: `hostile_global.pth` (a pickle that calls `os.system`), `not_a_model.pth` (a dict of
  numbers), `storage_too_short.pth` (a state dict whose storage record was cut short);
- `expected.safetensors`: every model fixture's `state_dict()` under `<file stem>/`, fixed
  input images and the outputs PyTorch computes on them in evaluation mode.

Run once, in a throw-away environment (never part of the project's tests or CI):

    python3 -m venv /tmp/venv-torch
    /tmp/venv-torch/bin/pip install torch torchvision safetensors numpy
    /tmp/venv-torch/bin/python scripts/make-torch-fixtures.py

It was run with the torch and torchvision versions recorded in `fixtures/VERSIONS`.
"""

import io
import os
import sys
import types
import zipfile
from pathlib import Path

import torch
import torch.nn as nn
import torchvision
from safetensors.torch import save_file
from torchvision.models.resnet import BasicBlock, ResNet

OUT = Path(__file__).resolve().parent.parent / "crates" / "pth" / "tests" / "fixtures"


def perturb_norms(module, gen):
    """Non-trivial BatchNorm statistics and affine parameters, and LayerNorm parameters."""
    for m in module.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=gen) * 0.2)
            m.running_var.copy_(torch.rand(c, generator=gen) + 0.5)
            m.num_batches_tracked.fill_(7)
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm)):
            n = m.weight.shape[0]
            m.weight.data.copy_(torch.rand(n, generator=gen) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=gen) * 0.1)


def small_resnet(classes, seed):
    """torchvision's ResNet with the parts of our `small` architecture at width 4."""
    torch.manual_seed(seed)
    net = ResNet(BasicBlock, [1, 1, 1, 1], num_classes=classes)
    net.conv1 = nn.Conv2d(3, 4, kernel_size=3, stride=1, padding=1, bias=False)
    net.bn1 = nn.BatchNorm2d(4)
    net.maxpool = nn.Identity()
    net.inplanes = 4
    net.layer1 = net._make_layer(BasicBlock, 4, 1)
    net.layer2 = net._make_layer(BasicBlock, 8, 1, stride=2)
    net.layer3 = net._make_layer(BasicBlock, 16, 1, stride=2)
    net.layer4 = net._make_layer(BasicBlock, 32, 1, stride=2)
    net.fc = nn.Linear(32, classes)
    with torch.no_grad():
        perturb_norms(net, torch.Generator().manual_seed(seed + 1))
    return net.eval()


def trunk(resnet, x):
    """The pooled features of a torchvision ResNet (its forward up to `fc`)."""
    x = resnet.maxpool(resnet.relu(resnet.bn1(resnet.conv1(x))))
    x = resnet.layer4(resnet.layer3(resnet.layer2(resnet.layer1(x))))
    return torch.flatten(resnet.avgpool(x), 1)


class Net(nn.Module):
    """The step-3 classifier's wrapper: the ResNet under `backbone` (registered below as
    `GCN_reg.graph_modules.Net`)."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone

    def forward(self, x):
        features = trunk(self.backbone, x)
        return self.backbone.fc(features), features


def defined_in(package_name, module_name):
    """Registers a class as `<package>.<module>.<name>`, where the reference defines it, so
    that the pickle names the same global."""

    def register(cls):
        package = sys.modules.setdefault(package_name, types.ModuleType(package_name))
        full = f"{package_name}.{module_name}"
        module = sys.modules.setdefault(full, types.ModuleType(full))
        setattr(package, module_name, module)
        cls.__module__ = full
        setattr(module, cls.__name__, cls)
        return cls

    return register


reference_module = defined_in("ad_similarity", "ad_modules")


defined_in("GCN_reg", "graph_modules")(Net)


@reference_module
class Backbone(nn.Module):
    """The SimNet's trunk: a ResNet whose `fc` was deleted."""

    def __init__(self, resnet):
        super().__init__()
        self.resnet = resnet
        self.n_feat = resnet.fc.in_features
        del self.resnet.fc

    def forward(self, x):
        return trunk(self.resnet, x)


def linear_bn_relu(cin, cout):
    return nn.Sequential(nn.Linear(cin, cout), nn.BatchNorm1d(cout), nn.ReLU(inplace=True))


@reference_module
class GANSimilarityHead4(nn.Module):
    """Head type 4: three Linear+BN+ReLU blocks, the second's output the domain feature."""

    def __init__(self, n_feat):
        super().__init__()
        self.fc1 = linear_bn_relu(2 * n_feat, 2 * n_feat)
        self.fc2 = linear_bn_relu(2 * n_feat, n_feat)
        self.fc3 = linear_bn_relu(n_feat, n_feat)
        self.fc4 = nn.Linear(n_feat, 2)
        self.diff_dim = n_feat

    def forward(self, pairs):
        diff = self.fc2(self.fc1(pairs))
        return self.fc4(self.fc3(diff)), diff


@reference_module
class GANSimilarityHead2(nn.Module):
    """Head type 2: one Linear+BN+ReLU block (the domain feature), then the output layer."""

    def __init__(self, n_feat):
        super().__init__()
        self.fc = nn.Linear(2 * n_feat, 4 * n_feat)
        self.bn = nn.BatchNorm1d(4 * n_feat)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Linear(4 * n_feat, 2)
        self.diff_dim = 4 * n_feat

    def forward(self, pairs):
        diff = self.relu(self.bn(self.fc(pairs)))
        return self.fc2(diff), diff


def gpu_data_parallel(module):
    """`DataParallel(module)` with the attributes it has when made on two GPUs."""
    dp = nn.DataParallel(module)
    dp.dim = 0
    dp.device_ids = [0, 1]
    dp.output_device = 0
    dp.src_device_obj = torch.device("cuda", 0)
    return dp


@reference_module
class GANSimilarityNet(nn.Module):
    """The SimNet: DataParallel trunk and head, applied to every ordered pair of a batch."""

    def __init__(self, resnet, head):
        super().__init__()
        self.backbone = gpu_data_parallel(Backbone(resnet))
        self.similarity_head = gpu_data_parallel(head(self.backbone.module.n_feat))
        self.diff_dim = self.similarity_head.module.diff_dim

    def pairs(self, features):
        """Row k pairs image k mod B (first half) with image k div B (second half)."""
        b = features.shape[0]
        first = features.repeat(b, 1)
        second = features.repeat(1, b).view(-1, features.shape[1])
        return torch.cat((first, second), dim=1)

    def forward(self, x):
        return self.similarity_head.module(self.pairs(self.backbone.module(x)))


@reference_module
class DomainClassifier(nn.Module):
    """The discriminator on the head's domain feature."""

    def __init__(self, dim):
        super().__init__()
        self.fc = nn.Linear(dim, dim)
        self.bn = nn.LayerNorm(dim)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Linear(dim, 2)

    def forward(self, x):
        return self.fc2(self.relu(self.bn(self.fc(x))))


class CallsSystem:
    """A pickle that would run a shell command under Python's unpickler."""

    def __reduce__(self):
        return (os.system, ("echo pwned",))


def save_as_if_on_gpu(obj, path):
    """torch.save with every storage tagged `cuda:0`, as the authors' files are."""
    active = {"on": True}
    torch.serialization.register_package(
        0,
        lambda storage: "cuda:0" if active["on"] else None,
        lambda storage, location: storage if location == "cuda:0" else None,
    )
    try:
        torch.save(obj, path)
    finally:
        active["on"] = False


def cut_storage(src, dst):
    """A copy of a zip checkpoint whose first storage record holds half its bytes."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for item in zin.infolist():
            data = zin.read(item.filename)
            if item.filename.endswith("/data/0"):
                data = data[: len(data) // 2]
            zout.writestr(item.filename, data)


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    expected = {}

    def remember(stem, module):
        for k, v in module.state_dict().items():
            expected[f"{stem}/{k}"] = v.detach().clone().contiguous()

    images = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    expected["input"] = images

    with torch.no_grad():
        net = Net(small_resnet(50, seed=10)).eval()
        dp = gpu_data_parallel(net)
        save_as_if_on_gpu(dp, OUT / "classifier_whole.pth")
        remember("classifier_whole", dp)
        torch.save(net.state_dict(), OUT / "classifier_params.pth")
        torch.save(
            net.state_dict(),
            OUT / "classifier_params_legacy.pth",
            _use_new_zipfile_serialization=False,
        )
        for stem in ["classifier_params", "classifier_params_legacy"]:
            remember(stem, net)
        logits, features = net(images)
        expected["classifier/logits"] = logits
        expected["classifier/features"] = features

        base = small_resnet(150, seed=20)
        dp = nn.DataParallel(base)
        torch.save(dp, OUT / "backbone_step0.pth")
        torch.save(dp, OUT / "backbone_step0_legacy.pth", _use_new_zipfile_serialization=False)
        remember("backbone_step0", dp)
        remember("backbone_step0_legacy", dp)
        expected["backbone_step0/logits"] = base(images)

        for head_no, head in [(4, GANSimilarityHead4), (2, GANSimilarityHead2)]:
            simnet = GANSimilarityNet(small_resnet(10, seed=30 + head_no), head)
            with torch.no_grad():
                perturb_norms(simnet, torch.Generator().manual_seed(40 + head_no))
            simnet.eval()
            torch.save(simnet, OUT / f"simnet_head{head_no}.pth")
            stem = f"simnet_head{head_no}"
            remember(stem, simnet)
            features = simnet.backbone.module(images)
            similarities, diff = simnet(images)
            expected[f"{stem}/features"] = features
            expected[f"{stem}/similarities"] = similarities
            expected[f"{stem}/diff_feat"] = diff
            if head_no == 4:
                torch.manual_seed(50)
                disc = DomainClassifier(simnet.diff_dim)
                perturb_norms(disc, torch.Generator().manual_seed(51))
                disc_dp = gpu_data_parallel(disc.eval())
                torch.save(disc_dp, OUT / "domain_classifier.pth")
                remember("domain_classifier", disc_dp)
                expected["domain_classifier/logits"] = disc(diff)

    torch.save({"weights": CallsSystem()}, OUT / "hostile_global.pth")
    torch.save({"epoch": 3, "acc": 0.8}, OUT / "not_a_model.pth")
    whole = io.BytesIO()
    torch.save({"w": torch.arange(64, dtype=torch.float32)}, whole)
    whole.seek(0)
    (OUT / "storage_ok.tmp").write_bytes(whole.read())
    cut_storage(OUT / "storage_ok.tmp", OUT / "storage_too_short.pth")
    (OUT / "storage_ok.tmp").unlink()

    save_file({k: v.contiguous() for k, v in expected.items()}, OUT / "expected.safetensors")
    (OUT / "VERSIONS").write_text(
        f"torch {torch.__version__}\ntorchvision {torchvision.__version__}\n"
    )
    print(f"wrote {len(list(OUT.iterdir()))} files to {OUT}")


if __name__ == "__main__":
    main()
