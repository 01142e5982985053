"""The GMBI module and GMBINet against slow, obviously-correct references written here."""
import numpy as np
import pytest
import torch

from edgekit.models.gmbinet import GMBI, GMBINet, GMBINetConfig


def _sigmoid(a):
    return 1.0 / (1.0 + np.exp(-a))


def _dwconv_ref(x, w, b, dil):
    """Depthwise 3x3 conv, zero padding = dilation, by explicit shifted sums (float64)."""
    c, h, wd = x.shape
    pad = np.zeros((c, h + 2 * dil, wd + 2 * dil))
    pad[:, dil:dil + h, dil:dil + wd] = x
    out = np.zeros_like(x)
    for ch in range(c):
        for ky in range(3):
            for kx in range(3):
                out[ch] += w[ch, 0, ky, kx] * pad[ch, ky * dil:ky * dil + h, kx * dil:kx * dil + wd]
        out[ch] += b[ch]
    return out


def _bn_ref(x, bn):
    g, beta = bn.weight.detach().double().numpy(), bn.bias.detach().double().numpy()
    m, v = bn.running_mean.double().numpy(), bn.running_var.double().numpy()
    return (x - m[:, None, None]) / np.sqrt(v[:, None, None] + bn.eps) * g[:, None, None] + beta[:, None, None]


def gmbi_reference(mod: GMBI, x: np.ndarray) -> np.ndarray:
    """One image (C x H x W), following the paper's description step by step."""
    n = mod.scales
    g = x.shape[0] // n
    groups = [x[i * g:(i + 1) * g] for i in range(n)]
    y = []
    for i in range(n):
        conv, bn = getattr(mod, f"conv{i}")[0], getattr(mod, f"conv{i}")[1]
        inp = groups[i] if i == 0 else _sigmoid(y[i - 1]) * groups[i] + groups[i]  # forward guidance
        z = _dwconv_ref(inp, conv.weight.detach().double().numpy(), conv.bias.detach().double().numpy(), i + 1)
        y.append(np.maximum(_bn_ref(z, bn), 0))
    enhanced = [_sigmoid(y[i + 1]) * y[i] + y[i] for i in range(n - 1)] + [y[n - 1]]  # backward enhancement
    cat = np.concatenate(enhanced, 0)
    pw, bn = mod.fusion[0], mod.fusion[1]
    w = pw.weight.detach().double().numpy()[:, :, 0, 0]
    fused = np.einsum("oc,chw->ohw", w, cat) + pw.bias.detach().double().numpy()[:, None, None]
    return np.maximum(_bn_ref(fused, bn), 0) + x


def _randomize_bn(mod, gen):
    for m in mod.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.3)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=gen) * 0.2)


@pytest.mark.parametrize("channels,scales,h,w", [(32, 4, 17, 23), (16, 4, 9, 9), (12, 3, 11, 8), (8, 2, 6, 13)])
def test_gmbi_matches_reference(channels, scales, h, w):
    gen = torch.Generator().manual_seed(channels * 7 + h)
    mod = GMBI(channels, scales).double()
    _randomize_bn(mod, gen)
    mod.eval()
    x = torch.randn(2, channels, h, w, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        got = mod(x).numpy()
    for b in range(2):
        np.testing.assert_allclose(got[b], gmbi_reference(mod, x[b].numpy()), rtol=1e-10, atol=1e-10)


def test_gmbi_split_follows_weights():
    """After a group's channels shrink (as pruning does), the split sizes follow the weights."""
    mod = GMBI(16, 4).eval()
    for i in range(4):
        seq = getattr(mod, f"conv{i}")
        seq[0] = torch.nn.Conv2d(3, 3, 3, padding=i + 1, dilation=i + 1, groups=3)
        seq[1] = torch.nn.BatchNorm2d(3)
    mod.fusion[0] = torch.nn.Conv2d(12, 12, 1)
    mod.fusion[1] = torch.nn.BatchNorm2d(12)
    assert mod.split_sizes() == [3, 3, 3, 3]
    assert mod(torch.randn(1, 12, 8, 8)).shape == (1, 12, 8, 8)


def test_network_heads_and_inference_mode():
    cfg = GMBINetConfig(widths=(8, 16, 16, 24, 32), depths=(1, 2, 1, 1))
    net = GMBINet(cfg)
    x = torch.randn(2, 3, 64, 48)
    net.train()
    heads = net(x)
    assert len(heads) == 5 and all(h.shape == (2, 1, 64, 48) for h in heads)
    net.eval()
    with torch.no_grad():
        main = net(x)
        net.all_heads = True
        all_heads = net(x)
    assert main.shape == (2, 1, 64, 48)
    torch.testing.assert_close(main, all_heads[0])
    assert float(main.min()) >= 0 and float(main.max()) <= 1


def test_config_rejects_groups_that_do_not_divide():
    from edgekit.errors import EdgekitError

    with pytest.raises(EdgekitError, match="not divisible"):
        GMBINetConfig(widths=(16, 30, 64, 96, 128))
