"""ROA (rectangular occlusion attack, METHOD.md s. 4): window, search, PGD-in-mask, video."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from abnn.attacks import ROA, InvalidInputError


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: one thread avoids oversubscription when other jobs share the CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# tiny models ----------------------------------------------------------------------------------
class RegionModel(nn.Module):
    """Two classes; the wrong class's logit is ``gain * sum(w * gray-ness)`` with ``w`` the
    indicator of one s x s region at ``corner``.  On a constant image darker than 0.5, filling
    the s x s window at (r, c) raises that logit by the overlap area, whose unique maximum is at
    ``corner``: the cross-entropy for label 0 is uniquely largest there."""

    def __init__(self, h: int, w: int, s: int, corner: tuple[int, int], gain: float = 0.05) -> None:
        super().__init__()
        weight = torch.zeros(h, w)
        weight[corner[0]:corner[0] + s, corner[1]:corner[1] + s] = gain
        self.register_buffer("weight", weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        wrong = (x.mean(1) * self.weight).flatten(1).sum(1)
        return torch.stack((torch.zeros_like(wrong), wrong), dim=1)


def conv_net(classes: int = 10) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, classes))


def video_net(classes: int = 5) -> nn.Module:
    return nn.Sequential(
        nn.Conv3d(3, 4, 3, padding=1), nn.BatchNorm3d(4), nn.ReLU(),
        nn.AdaptiveAvgPool3d((2, 2, 2)), nn.Flatten(), nn.Linear(32, classes))


def window_corners(x: torch.Tensor, x_adv: torch.Tensor, s: int) -> list[tuple[int, int]]:
    """Per image (or per frame of every clip): assert the changed pixels fit one s x s window;
    return the smallest changed (row, col)."""
    diff = (x_adv != x).any(dim=1)                         # (B, H, W) or (B, T, H, W)
    frames = diff.reshape(-1, *diff.shape[-2:])
    corners = []
    for d in frames:
        rs, cs = d.nonzero(as_tuple=True)
        assert rs.numel() > 0, "ROA changed nothing in a frame"
        assert int(rs.max() - rs.min()) < s and int(cs.max() - cs.min()) < s, "changes exceed one window"
        corners.append((int(rs.min()), int(cs.min())))
    return corners


# options and geometry -------------------------------------------------------------------------
def test_default_size_about_ten_percent():
    assert ROA.default_size(32, 32) == 10
    assert ROA.default_size(112, 112) == 35
    atk = ROA(conv_net())
    assert atk.side(32, 32) == 10 and ROA(conv_net(), size=4).side(32, 32) == 4


def test_candidates_include_both_ends():
    rows, cols = ROA(conv_net()).candidates(32, 32)
    assert rows.tolist() == list(range(23)) and cols.tolist() == list(range(23))   # 529 positions
    rows, _ = ROA(conv_net(), stride=4).candidates(32, 32)
    assert rows.tolist() == [0, 4, 8, 12, 16, 20, 22]
    rows, _ = ROA(conv_net(), size=32).candidates(32, 32)
    assert rows.tolist() == [0]


@pytest.mark.parametrize("kwargs", [dict(size=0), dict(stride=0), dict(search="random"), dict(top_k=0),
                                    dict(fill=2.0), dict(alpha=0.0), dict(steps=-1),
                                    dict(video_positions="all"), dict(search_batch=0)])
def test_bad_options(kwargs):
    with pytest.raises(ValueError):
        ROA(conv_net(), **kwargs)


def test_bad_inputs():
    atk = ROA(conv_net(), size=4)
    with pytest.raises(InvalidInputError):
        atk(torch.rand(2, 3, 8), torch.zeros(2, dtype=torch.long))
    with pytest.raises(InvalidInputError):
        ROA(conv_net(), size=9)(torch.rand(2, 3, 8, 8), torch.zeros(2, dtype=torch.long))


# the contract on images -----------------------------------------------------------------------
def test_only_one_window_changes_and_contract():
    torch.manual_seed(0)
    model = conv_net()
    x = torch.rand(4, 3, 32, 32)
    y = torch.randint(0, 10, (4,))
    x0 = x.clone()
    atk = ROA(model, size=10, seed=0)
    x_adv = atk(x, y)
    assert torch.equal(x, x0), "input was modified"
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
    assert 0 <= x_adv.min() and x_adv.max() <= 1
    corners = window_corners(x, x_adv, 10)
    # the changed pixels lie in the window the search picked; outside it nothing changed
    picked = atk.locate(x, y)
    for i, (r, c) in enumerate(picked.tolist()):
        inside = torch.zeros(32, 32, dtype=torch.bool)
        inside[r:r + 10, c:c + 10] = True
        assert torch.equal(x_adv[i][:, ~inside], x[i][:, ~inside])
        assert corners[i][0] >= r and corners[i][1] >= c


def test_mode_restored():
    model = conv_net()
    x, y = torch.rand(2, 3, 16, 16), torch.tensor([1, 2])
    for search in ("exhaustive", "gradient"):
        model.train()
        ROA(model, size=4, search=search, steps=2)(x, y)
        assert model.training and all(m.training for m in model.modules())
        model.eval()
        ROA(model, size=4, search=search, steps=2)(x, y)
        assert not any(m.training for m in model.modules())
    assert all(p.grad is None for p in model.parameters())


# the search ---------------------------------------------------------------------------------
@pytest.mark.parametrize("corner", [(22, 22), (0, 0), (7, 15), (0, 22), (22, 3)])
def test_exhaustive_finds_known_worst_position(corner):
    model = RegionModel(32, 32, 10, corner)
    x = torch.full((2, 3, 32, 32), 0.2)
    y = torch.zeros(2, dtype=torch.long)
    atk = ROA(model, steps=0)                               # default size 10: 23 x 23 positions
    assert atk.locate(x, y).tolist() == [list(corner)] * 2
    x_adv = atk(x, y)
    expected = x.clone()
    expected[:, :, corner[0]:corner[0] + 10, corner[1]:corner[1] + 10] = 0.5
    assert torch.equal(x_adv, expected)
    # odd chunking and a stride that does not divide 22 give the same corner
    assert ROA(model, steps=0, search_batch=7).locate(x, y).tolist() == [list(corner)] * 2
    if corner == (22, 22):
        assert ROA(model, steps=0, stride=4).locate(x, y).tolist() == [[22, 22]] * 2


def test_gradient_search_with_all_positions_equals_exhaustive():
    torch.manual_seed(1)
    model = conv_net()
    x = torch.rand(3, 3, 16, 16)
    y = torch.randint(0, 10, (3,))
    n_pos = 13 * 13
    ex = ROA(model, size=4, steps=0).locate(x, y)
    gr = ROA(model, size=4, steps=0, search="gradient", top_k=n_pos).locate(x, y)
    assert torch.equal(ex, gr)
    a = ROA(model, size=4, steps=3)(x, y)
    b = ROA(model, size=4, steps=3, search="gradient", top_k=n_pos)(x, y)
    assert torch.equal(a, b)


def test_gradient_search_valid_window_and_known_region():
    torch.manual_seed(2)
    model = conv_net()
    x = torch.rand(3, 3, 16, 16)
    y = torch.randint(0, 10, (3,))
    atk = ROA(model, size=5, search="gradient", top_k=5)
    x_adv = atk(x, y)
    window_corners(x, x_adv, 5)
    assert ((0 <= atk.locate(x, y)) & (atk.locate(x, y) <= 11)).all()
    # the input gradient of RegionModel is nonzero only in the region: top-k finds its corner
    region = RegionModel(32, 32, 10, (22, 22))
    xs, ys = torch.full((1, 3, 32, 32), 0.2), torch.zeros(1, dtype=torch.long)
    assert ROA(region, search="gradient", top_k=3).locate(xs, ys).tolist() == [[22, 22]]


def test_search_picks_highest_gray_loss():
    """The picked window's gray-fill loss is the maximum over all windows (brute force)."""
    torch.manual_seed(3)
    model = conv_net().eval()
    x = torch.rand(2, 3, 12, 12)
    y = torch.randint(0, 10, (2,))
    picked = ROA(model, size=4, steps=0).locate(x, y)
    with torch.no_grad():
        for i in range(2):
            losses = {}
            for r in range(9):
                for c in range(9):
                    xi = x[i:i + 1].clone()
                    xi[:, :, r:r + 4, c:c + 4] = 0.5
                    losses[(r, c)] = F.cross_entropy(model(xi), y[i:i + 1]).item()
            best = max(losses.values())
            assert losses[tuple(picked[i].tolist())] >= best - 1e-6


# strength -----------------------------------------------------------------------------------
def _blobs(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """4 classes: a white 4x4 square in quadrant y of a dim noise image (16x16)."""
    y = torch.randint(0, 4, (n,), generator=g)
    x = torch.rand(n, 3, 16, 16, generator=g) * 0.5
    for k in range(4):
        r, c = 2 + 8 * (k // 2), 2 + 8 * (k % 2)
        x[y == k, :, r:r + 4, c:c + 4] = 1.0
    return x, y


def test_accuracy_under_roa_drops():
    """A briefly trained undefended net: clean accuracy high, robust accuracy under ROA low."""
    torch.manual_seed(4)
    g = torch.Generator().manual_seed(0)
    model = conv_net(4)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):
        x, y = _blobs(64, g)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    x, y = _blobs(64, g)
    with torch.no_grad():
        clean_ok = model(x).argmax(1) == y
    for search in ("exhaustive", "gradient"):
        x_adv = ROA(model, size=5, search=search)(x, y)
        gray = ROA(model, size=5, search=search, steps=0)(x, y)
        with torch.no_grad():
            adv_ok = model(x_adv).argmax(1) == y
            loss_gray = F.cross_entropy(model(gray), y)
            loss_adv = F.cross_entropy(model(x_adv), y)
        clean, robust = clean_ok.float().mean().item(), (clean_ok & adv_ok).float().mean().item()
        assert clean >= 0.9, f"the tiny net did not learn the task (clean {clean:.0%})"
        assert robust <= clean - 0.5, f"{search}: ROA left {robust:.0%} robust accuracy (clean {clean:.0%})"
        assert loss_adv > loss_gray                         # the sign steps add to the search


# seeds and video ----------------------------------------------------------------------------
def test_same_seed_same_result():
    torch.manual_seed(5)
    img, vid = conv_net(), video_net()
    x, y = torch.rand(2, 3, 16, 16), torch.tensor([0, 3])
    assert torch.equal(ROA(img, size=4, seed=7)(x, y), ROA(img, size=4, seed=7)(x, y))
    xv, yv = torch.rand(2, 3, 4, 16, 16), torch.tensor([1, 4])
    a = ROA(vid, size=5, seed=7)(xv, yv)
    b = ROA(vid, size=5, seed=7)(xv, yv)
    assert torch.equal(a, b)
    assert torch.equal(ROA(vid, size=5, seed=7).locate(xv, yv), ROA(vid, size=5, seed=7).locate(xv, yv))
    assert not torch.equal(ROA(vid, size=5, seed=7).locate(xv, yv), ROA(vid, size=5, seed=8).locate(xv, yv))


@pytest.mark.parametrize("mode", ["random", "search", "gradient"])
def test_video_one_window_per_frame(mode):
    torch.manual_seed(6)
    model = video_net()
    x = torch.rand(2, 3, 4, 16, 16)
    y = torch.tensor([0, 2])
    x0 = x.clone()
    kw = dict(video_positions="random") if mode == "random" else dict(
        video_positions="search", search="exhaustive" if mode == "search" else "gradient", top_k=6)
    atk = ROA(model, size=5, seed=0, search_batch=64, **kw)
    x_adv = atk(x, y)
    assert torch.equal(x, x0)
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
    assert 0 <= x_adv.min() and x_adv.max() <= 1
    corners = window_corners(x, x_adv, 5)                   # 2 clips x 4 frames
    assert len(corners) == 8
    picked = atk.locate(x, y)
    assert picked.shape == (2, 4, 2)
    outside = torch.ones(2, 4, 16, 16, dtype=torch.bool)
    for b in range(2):
        for t in range(4):
            r, c = picked[b, t].tolist()
            outside[b, t, r:r + 5, c:c + 5] = False
    assert torch.equal(x_adv.permute(0, 2, 3, 4, 1)[outside], x.permute(0, 2, 3, 4, 1)[outside])


def test_video_search_finds_known_region_per_frame():
    """Each frame's known worst corner is found by the per-frame search."""
    corners = [(0, 0), (11, 11), (3, 9)]

    class ClipRegion(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.frames = nn.ModuleList(RegionModel(16, 16, 5, c) for c in corners)

        def forward(self, x):
            return sum(m(x[:, :, t]) for t, m in enumerate(self.frames))

    x = torch.full((1, 3, 3, 16, 16), 0.2)
    y = torch.zeros(1, dtype=torch.long)
    picked = ROA(ClipRegion(), size=5, video_positions="search", steps=0).locate(x, y)
    assert picked[0].tolist() == [list(c) for c in corners]


def test_roa_returns_the_first_fooling_iterate():
    """A model whose class 1 wins only in a band of mean pixel values: the sticker's second sign
    step leaves the band the first step reached; ROA keeps the first step."""
    from test_pgd import Band

    a = 70 / 255
    frac = 25 / 100  # a 5x5 sticker on 10x10 images
    model = Band(0.5 + 0.8 * a * frac, 0.5 * a * frac)
    x, y = torch.full((2, 3, 10, 10), 0.5), torch.zeros(2, dtype=torch.long)
    x_adv = ROA(model, size=5, stride=5, alpha=a, steps=2)(x, y)
    with torch.no_grad():
        assert (model(x).argmax(1) == 0).all() and (model(x_adv).argmax(1) == 1).all()
    assert torch.allclose(x_adv.mean(dim=(1, 2, 3)), torch.full((2,), 0.5 + a * frac))
