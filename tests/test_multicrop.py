"""Tests of medspan.data.multicrop: priors must follow the global views exactly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Compose
from monai.utils import set_determinism
from scipy.ndimage import gaussian_filter

from medspan.data.multicrop import (
    MultiCropd,
    RandIsotropicGaussianBlur,
    crop_and_resize,
    sample_crop_box,
    view_jitter,
)
from medspan.errors import DataError


def _square_image(shape=(64, 64), lo=(16, 32), side=8) -> torch.Tensor:
    img = torch.zeros((1, *shape), dtype=torch.float32)
    img[0, lo[0] : lo[0] + side, lo[1] : lo[1] + side] = 1.0
    return img


def test_prior_equal_to_image_is_bit_exact_for_many_seeds():
    g = torch.Generator().manual_seed(0)
    img = torch.rand(1, 80, 60, generator=g)
    t = MultiCropd(global_size=32, local_size=16, n_local=2, intensity=False, flip="swap", flip_prob=0.5,
                   swap_pairs=((0, 0),))
    for seed in range(40):
        t.set_random_state(seed)
        out = t({"image": img, "prior": img.clone()})
        assert torch.equal(out["global_priors"], out["global_crops"]), seed


def test_known_square_lands_at_known_location():
    # full-image box (scale 1, ratio 1) and a 2x antialiased bilinear shrink: each output pixel
    # i sees inputs 2i-1..2i+2 with weights 1/8, 3/8, 3/8, 1/8, so the square [16, 24) x [32, 40)
    # becomes the profile 1/8, 7/8, 1, 1, 7/8, 1/8 starting at 7 (x) and 15 (y).
    img = _square_image()
    t = MultiCropd(global_size=32, n_global=2, n_local=0, global_scale=(1, 1), ratio=(1, 1), intensity=False)
    t.set_random_state(3)
    out = t({"image": img, "prior": torch.cat([img, 1 - img])})
    assert out["global_boxes"].tolist() == [[0, 0, 64, 64], [0, 0, 64, 64]]
    prof = torch.tensor([1 / 8, 7 / 8, 1, 1, 7 / 8, 1 / 8])
    px = torch.zeros(32)
    px[7:13] = prof
    py = torch.zeros(32)
    py[15:21] = prof
    expected = torch.outer(px, py)
    for v in range(2):
        torch.testing.assert_close(out["global_crops"][v, 0], expected, atol=1e-6, rtol=0)
        torch.testing.assert_close(out["global_priors"][v, 0], expected, atol=1e-6, rtol=0)
        torch.testing.assert_close(out["global_priors"][v, 1], 1 - expected, atol=1e-6, rtol=0)
        mask = torch.zeros(32, 32, dtype=torch.bool)
        mask[8:12, 16:20] = True
        assert torch.equal(out["global_crops"][v, 0] > 0.5, mask)
        assert torch.equal(out["global_priors"][v, 0] > 0.5, mask)


def test_centre_crop_fallback_box():
    # a square box with the full area cannot fit a 64x48 image: fallback = centred 48x48
    box = sample_crop_box(np.random.RandomState(0), (64, 48), scale=(1, 1), ratio=(1, 1))
    assert box == (8, 0, 56, 48)
    box = sample_crop_box(np.random.RandomState(0), (40, 64), scale=(1, 1), ratio=(1, 1))
    assert box == (0, 12, 40, 52)


def test_sample_crop_box_respects_scale_ratio_and_bounds():
    rng = np.random.RandomState(1)
    for _ in range(200):
        x0, y0, x1, y1 = sample_crop_box(rng, (100, 80), scale=(0.2, 0.5), ratio=(0.75, 4 / 3))
        assert 0 <= x0 < x1 <= 100 and 0 <= y0 < y1 <= 80
        w, h = x1 - x0, y1 - y0
        assert 0.2 * 8000 * 0.9 <= w * h <= 0.5 * 8000 * 1.1
        assert 0.75 * 0.9 <= w / h <= 4 / 3 * 1.1


def test_crop_and_resize_known_box_identity_scale():
    img = torch.zeros(2, 64, 64)
    img[0, 15, 30] = 5.0
    img[1, 15, 30] = 7.0
    out = crop_and_resize(img, (10, 20, 42, 52), 32)  # 32x32 box -> no resampling
    assert out.shape == (2, 32, 32)
    assert out[0].nonzero().tolist() == [[5, 10]] and out[0, 5, 10] == 5.0
    assert out[1, 5, 10] == 7.0


def test_sampled_box_maps_marked_pixel_to_expected_location():
    shape = (90, 70)
    t = MultiCropd(global_size=32, n_local=0, intensity=False, global_scale=(0.3, 0.6))
    t.set_random_state(11)
    boxes = t({"image": torch.zeros(1, *shape), "prior": torch.zeros(1, *shape)})["global_boxes"]
    for v, (x0, y0, x1, y1) in enumerate(boxes.tolist()):
        # a marked pixel in the middle of this box; the same seed gives the same boxes
        px, py = (x0 + x1) // 2, (y0 + y1) // 2
        img = torch.zeros(1, *shape)
        img[0, px, py] = 1.0
        t.set_random_state(11)
        out = t({"image": img, "prior": img.clone()})
        assert out["global_boxes"].tolist() == boxes.tolist()
        ux = (px - x0 + 0.5) * 32 / (x1 - x0) - 0.5
        uy = (py - y0 + 0.5) * 32 / (y1 - y0) - 0.5
        for arr in (out["global_crops"][v, 0], out["global_priors"][v, 0]):
            i, j = divmod(int(arr.argmax()), 32)
            assert abs(i - ux) <= 0.5 + 1e-6 and abs(j - uy) <= 0.5 + 1e-6
        torch.testing.assert_close(out["global_crops"][v], crop_and_resize(img, (x0, y0, x1, y1), 32))


def test_swap_flip_mirrors_and_swaps_channels():
    g = torch.Generator().manual_seed(1)
    img = torch.rand(1, 48, 40, generator=g)
    prior = torch.rand(3, 48, 40, generator=g)
    t_none = MultiCropd(global_size=24, n_local=0, intensity=False, flip="none")
    t_swap = MultiCropd(global_size=24, n_local=0, intensity=False, flip="swap", flip_prob=0.5,
                        swap_pairs=((0, 1),))
    t_plain = MultiCropd(global_size=24, n_local=0, intensity=False, flip="plain", flip_prob=0.5)
    seen_flip = seen_keep = False
    for seed in range(20):
        ref = t_none.set_random_state(seed)({"image": img, "prior": prior})
        sw = t_swap.set_random_state(seed)({"image": img, "prior": prior})
        pl = t_plain.set_random_state(seed)({"image": img, "prior": prior})
        assert torch.equal(ref["global_boxes"], sw["global_boxes"])
        for v in range(2):
            if sw["global_flips"][v]:
                seen_flip = True
                mirror = ref["global_priors"][v].flip(1)  # spatial axis 0 = tensor dim 1
                assert torch.equal(sw["global_crops"][v], ref["global_crops"][v].flip(1))
                assert torch.equal(sw["global_priors"][v, 0], mirror[1])
                assert torch.equal(sw["global_priors"][v, 1], mirror[0])
                assert torch.equal(sw["global_priors"][v, 2], mirror[2])
                assert torch.equal(pl["global_priors"][v], mirror)
            else:
                seen_keep = True
                assert torch.equal(sw["global_crops"][v], ref["global_crops"][v])
                assert torch.equal(sw["global_priors"][v], ref["global_priors"][v])
    assert seen_flip and seen_keep


def test_flip_axis_parameter():
    img = torch.rand(1, 16, 16, generator=torch.Generator().manual_seed(2))
    kw = dict(global_size=16, n_local=0, intensity=False, global_scale=(1, 1), ratio=(1, 1), flip_prob=1.0)
    out = MultiCropd(flip="plain", flip_spatial_axis=1, **kw).set_random_state(0)({"image": img, "prior": img})
    assert torch.equal(out["global_crops"][0, 0], img[0].flip(1))
    out = MultiCropd(flip="plain", flip_spatial_axis=0, **kw).set_random_state(0)({"image": img, "prior": img})
    assert torch.equal(out["global_crops"][0, 0], img[0].flip(0))


def test_none_never_flips():
    img = torch.zeros(1, 32, 32)
    img[0, :4, :] = 1.0  # bright band at small x: a flip would move it to large x
    t = MultiCropd(global_size=32, local_size=32, n_local=1, intensity=False, global_scale=(1, 1),
                   local_scale=(1, 1), ratio=(1, 1), flip="none", flip_prob=1.0)
    t.set_random_state(0)
    for _ in range(100):
        out = t({"image": img, "prior": img})
        assert not out["global_flips"].any()
        assert torch.equal(out["global_crops"][:, 0], img.expand(2, 32, 32))
        assert torch.equal(out["local_crops"][:, 0], img)


def test_determinism_and_compose():
    img = torch.rand(1, 64, 64, generator=torch.Generator().manual_seed(3))
    prior = torch.rand(2, 64, 64, generator=torch.Generator().manual_seed(4))
    t = MultiCropd(global_size=32, local_size=16, n_local=3, flip="swap")
    a = t.set_random_state(7)({"image": img, "prior": prior})
    b = t.set_random_state(7)({"image": img, "prior": prior})
    c = t.set_random_state(8)({"image": img, "prior": prior})
    for key in ("global_crops", "global_priors", "local_crops", "global_boxes"):
        assert torch.equal(a[key], b[key])
    assert not torch.equal(a["global_boxes"], c["global_boxes"])

    def run():
        set_determinism(seed=5)
        comp = Compose([MultiCropd(global_size=32, local_size=16, n_local=2)])
        return comp({"image": img, "prior": prior})

    try:
        x, y = run(), run()
    finally:
        set_determinism(None)
    assert torch.equal(x["global_crops"], y["global_crops"]) and torch.equal(x["local_crops"], y["local_crops"])


def test_shapes_dtypes_and_kept_keys():
    img = MetaTensor(torch.randint(0, 255, (1, 70, 50)).to(torch.uint8), meta={"filename_or_obj": "a.png"})
    t = MultiCropd(global_size=32, local_size=16, n_global=2, n_local=5)
    data = {"image": img, "prior": torch.rand(3, 70, 50), "label": torch.tensor([1, 0]), "id": "p1"}
    out = t.set_random_state(0)(data)
    assert out["global_crops"].shape == (2, 1, 32, 32) and out["global_crops"].dtype == torch.float32
    assert out["global_priors"].shape == (2, 3, 32, 32) and out["global_priors"].dtype == torch.float32
    assert out["local_crops"].shape == (5, 1, 16, 16) and out["local_crops"].dtype == torch.float32
    assert out["global_boxes"].shape == (2, 4) and out["global_boxes"].dtype == torch.int64
    assert type(out["global_crops"]) is torch.Tensor
    assert "image" not in out and "prior" not in out
    assert out["id"] == "p1" and out["label"].tolist() == [1, 0]
    # intensity stays inside the view's range
    assert float(out["global_crops"].min()) >= 0.0 and float(out["global_crops"].max()) <= 255.0

    out = MultiCropd(global_size=32, local_size=16, n_local=0, drop_source=False).set_random_state(0)({"image": img})
    assert out["local_crops"].shape == (0, 1, 16, 16)
    assert "global_priors" not in out and "image" in out


def test_mismatched_prior_names_the_file():
    img = MetaTensor(torch.rand(1, 64, 64), meta={"filename_or_obj": "/data/cxr/p0001.png"})
    t = MultiCropd(global_size=32, n_local=0)
    with pytest.raises(DataError, match=r"/data/cxr/p0001\.png.*\(3, 60, 64\).*\(1, 64, 64\)"):
        t({"image": img, "prior": torch.rand(3, 60, 64)})
    with pytest.raises(DataError, match=r"p0001\.png.*\(C, x, y\).*\(1, 64, 64, 8\)"):
        t({"image": MetaTensor(torch.rand(1, 64, 64, 8), meta={"filename_or_obj": "/data/cxr/p0001.png"})})


def test_intensity_jitter_changes_only_the_crops_and_is_seeded():
    img = torch.rand(1, 64, 64, generator=torch.Generator().manual_seed(3))
    prior = torch.rand(2, 64, 64, generator=torch.Generator().manual_seed(4))
    kw = {"global_size": 32, "local_size": 16, "n_local": 3, "flip": "swap"}
    on = MultiCropd(**kw).set_random_state(11)({"image": img, "prior": prior})
    off = MultiCropd(**kw, intensity=False).set_random_state(11)({"image": img, "prior": prior})
    for key in ("global_boxes", "local_boxes", "global_flips", "global_priors"):
        assert torch.equal(on[key], off[key]), key  # same geometry, priors never jittered
    assert not torch.equal(on["global_crops"], off["global_crops"])  # the first global view is always blurred
    again = MultiCropd(**kw).set_random_state(11)({"image": img, "prior": prior})
    assert torch.equal(on["local_crops"], again["local_crops"])


def test_view_jitter_parts_do_what_they_say():
    u = torch.linspace(0, 1, 64).reshape(1, 8, 8)
    off = {"brightness": 0.0, "contrast": 0.0, "gamma_prob": 0.0, "blur_prob": 0.0, "noise_prob": 0.0}
    torch.testing.assert_close(view_jitter(jitter_prob=1.0, **off)(u).as_tensor(), u)  # factors 1: identity
    brighter = view_jitter(jitter_prob=1.0, **{**off, "brightness": 0.4}).set_random_state(0)(u).as_tensor()
    factor = brighter[0, 1, 1] / u[0, 1, 1]  # one factor in [0.6, 1.4] for the whole view, then clipped
    assert 0.6 <= factor <= 1.4 and torch.allclose(brighter, (u * factor).clamp(0, 1))
    solarized = view_jitter(jitter_prob=0.0, solarize_prob=1.0, **off)(u).as_tensor()
    assert torch.equal(solarized, torch.where(u >= 0.5, 1.0 - u, u))
    noisy = view_jitter(jitter_prob=0.0, **{**off, "noise_prob": 1.0}, noise_std=0.5)(u).as_tensor()
    assert noisy.min() >= 0.0 and noisy.max() <= 1.0 and not torch.equal(noisy, u)


@pytest.mark.parametrize("sigma", [0.5, 1.3, 2.0])
def test_isotropic_blur_matches_scipy_and_keeps_the_border(sigma):
    x = torch.rand(2, 20, 16, generator=torch.Generator().manual_seed(0))
    out = RandIsotropicGaussianBlur(sigma=(sigma, sigma), prob=1.0)(x)
    ref = gaussian_filter(x.double().numpy(), (0, sigma, sigma), mode="mirror", truncate=3.0)
    np.testing.assert_allclose(out.numpy(), ref, atol=1e-6)
    const = torch.full((1, 5, 5), 0.7)  # radius 6 >= side: edge replicated, still no dark border
    torch.testing.assert_close(RandIsotropicGaussianBlur(sigma=(2.0, 2.0), prob=1.0)(const), const)


REAL = Path(__file__).resolve().parents[2] / "shared/data/real"
MHH = REAL / "mhh_covid_cxr_v7_lungs"


@pytest.mark.real_data
@pytest.mark.skipif(not (MHH / "images/19abe1f3.jpg").exists(), reason="needs ../shared/data/real")
def test_real_cxr_lung_mask_follows_the_crops():
    from monai.transforms import EnsureChannelFirstd, LoadImaged, ScaleIntensityd

    load = Compose([
        LoadImaged(["image", "prior"], reader="PILReader"),
        EnsureChannelFirstd(["image", "prior"]),
        ScaleIntensityd(["image", "prior"]),
    ])
    d = load({"image": str(MHH / "images/19abe1f3.jpg"), "prior": str(MHH / "masks/19abe1f3.png")})
    assert d["image"].shape == d["prior"].shape == (1, 2000, 2000)
    prior = d["prior"].as_tensor().clone()
    image = d["image"].as_tensor().clone()
    t = MultiCropd(global_size=64, local_size=32, n_local=2, intensity=False, global_scale=(0.6, 1.0))
    out = t.set_random_state(1)(d)
    for v, box in enumerate(out["global_boxes"].tolist()):
        assert torch.equal(out["global_priors"][v], crop_and_resize(prior, box, 64))
        assert torch.equal(out["global_crops"][v], crop_and_resize(image, box, 64))
        crop, lung = out["global_crops"][v, 0], out["global_priors"][v, 0]
        # aerated lung is darker than the rest of the chest in a radiograph
        assert crop[lung > 0.9].mean() < crop[lung < 0.1].mean()
    with pytest.raises(DataError, match="19abe1f3.jpg"):
        t({"image": d["image"], "prior": prior[:, :1000]})
