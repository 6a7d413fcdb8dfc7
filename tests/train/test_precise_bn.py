"""PreciseBN against the plain average of per-batch statistics, computed independently."""

import torch
from torch import nn

from orchestrator.train.precise_bn import precise_bn


def test_running_stats_become_the_mean_of_batch_statistics_and_the_rest_is_untouched():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, momentum=0.3), nn.GroupNorm(2, 4)).eval()
    batches = [torch.randn(2, 3, 5, 5) * (i + 1) + i for i in range(5)]
    weights = {
        k: v.clone() for k, v in net.state_dict().items() if "running" not in k and "num_batches" not in k
    }

    assert precise_bn(net, iter(batches), num_batches=3) == 3

    feats = [net[0](b).detach() for b in batches[:3]]
    mean = torch.stack([f.mean((0, 2, 3)) for f in feats]).mean(0)
    var = torch.stack([f.var((0, 2, 3), unbiased=True) for f in feats]).mean(0)
    torch.testing.assert_close(net[1].running_mean, mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(net[1].running_var, var, rtol=1e-5, atol=1e-6)
    assert net[1].momentum == 0.3 and not net.training
    for k, v in weights.items():
        assert torch.equal(net.state_dict()[k], v), k


def test_models_without_batch_statistics_are_left_alone():
    net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.GroupNorm(2, 4))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    assert precise_bn(net, iter([torch.randn(2, 3, 4, 4)]), num_batches=4) == 0
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
