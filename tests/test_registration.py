"""Tests of medspan.atlas.registration: known transforms recovered, warping, checks, determinism."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from medspan.atlas.build import dice
from medspan.atlas.registration import (
    RegistrationSettings,
    affine_matrix,
    from_sitk,
    jacobian_stats,
    reduce_to,
    register,
    to_sitk,
    warp,
    warp_masks,
)


def _phantom(size: int = 96) -> tuple[np.ndarray, np.ndarray]:
    """A smooth 2D test image (x, y) with two dark 'lungs' and a bright 'heart', and its lung masks."""
    x, y = np.meshgrid(np.linspace(-1, 1, size), np.linspace(-1, 1, size), indexing="ij")
    body = ((x / 0.9) ** 2 + (y / 0.95) ** 2) < 1
    left = (((x - 0.4) / 0.28) ** 2 + ((y + 0.05) / 0.6) ** 2) < 1
    right = (((x + 0.42) / 0.3) ** 2 + ((y - 0.02) / 0.55) ** 2) < 1
    heart = (((x - 0.1) / 0.25) ** 2 + ((y - 0.35) / 0.2) ** 2) < 1
    img = 0.2 + 0.6 * body - 0.5 * (left | right) + 0.4 * heart + 0.15 * np.sin(3 * x) * np.cos(2 * y)
    from scipy import ndimage

    return ndimage.gaussian_filter(img, 1.5).astype(np.float32), np.stack([left, right])


def _affine(dim: int, matrix, translation, centre) -> sitk.AffineTransform:
    t = sitk.AffineTransform(dim)
    t.SetMatrix(tuple(np.asarray(matrix, float).ravel()))
    t.SetTranslation(tuple(float(v) for v in translation))
    t.SetCenter(tuple(float(v) for v in centre))
    return t


AFFINE_ONLY_2D = RegistrationSettings(method="affine", init="geometry", max_size=None, sampling=0.5,
                                      affine_iterations=300)


def test_to_sitk_axis_order_and_ras_geometry():
    arr = np.arange(12, dtype=np.float32).reshape(4, 3)  # (x, y)
    img = to_sitk(arr, spacing=(0.5, 2.0))
    assert img.GetSize() == (4, 3) and img.GetSpacing() == (0.5, 2.0)
    assert img.GetPixel(3, 1) == arr[3, 1]
    np.testing.assert_array_equal(from_sitk(img), arr)
    # 3D RAS affine diag(-2, -3, 4) + origin -> ITK LPS: direction diag(1, 1, 1), origin (-ox, -oy, oz)
    aff = np.diag([-2.0, -3.0, 4.0, 1.0])
    aff[:3, 3] = (10.0, 20.0, 30.0)
    vol = to_sitk(np.zeros((5, 6, 7)), aff)
    assert vol.GetSize() == (5, 6, 7)
    np.testing.assert_allclose(vol.GetSpacing(), (2, 3, 4))
    np.testing.assert_allclose(vol.GetDirection(), np.eye(3).ravel())
    np.testing.assert_allclose(vol.GetOrigin(), (-10, -20, 30))


def test_reduce_to_keeps_extent():
    img = to_sitk(np.ones((256, 200), np.float32))
    small = reduce_to(img, 128)
    assert small.GetSize() == (128, 100)
    assert small.GetSpacing() == (2.0, 2.0)
    assert reduce_to(img, None) is img and reduce_to(img, 256) is img


def test_known_affine_recovered_and_inverse_maps_mask_back():
    fixed_arr, masks = _phantom(96)
    fixed = to_sitk(fixed_arr)
    a = np.deg2rad(6.0)
    true_mat = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]) @ np.diag([1.08, 0.94])
    true = _affine(2, true_mat, (3.0, -2.0), (47.5, 47.5))  # fixed point -> moving point
    moving = warp(fixed, true.GetInverse(), fixed)  # moving(true(p)) == fixed(p)
    moving_masks = warp_masks(masks, fixed, true.GetInverse(), fixed, "nearest")

    res = register(fixed, moving, AFFINE_ONLY_2D)
    assert res.status == "ok" and res.method == "affine"
    got_mat, got_t = affine_matrix(res.transform)
    want_mat, want_t = affine_matrix(true)
    np.testing.assert_allclose(got_mat, want_mat, atol=0.02)
    np.testing.assert_allclose(got_t, want_t, atol=0.6)
    # the exemplar (moving) masks land on the fixed masks ...
    on_fixed = warp_masks(moving_masks, moving, res.transform, fixed, "nearest")
    assert min(dice(on_fixed[i], masks[i]) for i in range(2)) >= 0.98
    # ... and the inverse transform maps them back onto the moving masks
    back = warp_masks(on_fixed, fixed, res.transform.GetInverse(), moving, "nearest")
    assert min(dice(back[i], moving_masks[i]) for i in range(2)) >= 0.98
    assert res.jacobian["folded_fraction"] == 0.0
    np.testing.assert_allclose(res.jacobian["min"], np.linalg.det(want_mat), rtol=0.03)


def test_registration_is_deterministic():
    fixed_arr, _ = _phantom(64)
    fixed = to_sitk(fixed_arr)
    moving = warp(fixed, _affine(2, np.diag([1.05, 0.97]), (2.0, 1.0), (31.5, 31.5)), fixed)
    s = RegistrationSettings(method="demons", max_size=None, sampling=0.3)
    r1, r2 = register(fixed, moving, s), register(fixed, moving, s)
    np.testing.assert_array_equal(affine_matrix(r1.affine)[0], affine_matrix(r2.affine)[0])
    d1 = sitk.GetArrayFromImage(sitk.TransformToDisplacementField(r1.transform, sitk.sitkVectorFloat64, fixed.GetSize()))
    d2 = sitk.GetArrayFromImage(sitk.TransformToDisplacementField(r2.transform, sitk.sitkVectorFloat64, fixed.GetSize()))
    np.testing.assert_array_equal(d1, d2)
    assert r1.metrics == r2.metrics


@pytest.mark.parametrize("method", ["demons", "demons_cc"])
def test_deformable_recovers_a_smooth_deformation_better_than_affine(method: str):
    fixed_arr, masks = _phantom(96)
    fixed = to_sitk(fixed_arr)
    # smooth non-affine displacement: the left side bulges
    field = np.zeros((96, 96, 2))
    x, y = np.meshgrid(np.arange(96), np.arange(96), indexing="ij")
    field[..., 0] = 4.0 * np.exp(-((x - 65) ** 2 + (y - 45) ** 2) / (2 * 15.0**2))
    disp = sitk.GetImageFromArray(field.transpose(1, 0, 2), isVector=True)  # (y, x, 2) -> size (96, 96)
    bulge = sitk.DisplacementFieldTransform(sitk.Cast(disp, sitk.sitkVectorFloat64))
    moving = warp(fixed, bulge, fixed)
    moving_masks = warp_masks(masks, fixed, bulge, fixed, "nearest")
    aff = register(fixed, moving, RegistrationSettings(method="affine", max_size=None))
    dem = register(fixed, moving, RegistrationSettings(method=method, max_size=None))
    assert dem.method == method and dem.status == "ok"
    d_aff = dice(warp_masks(moving_masks, moving, aff.transform, fixed, "nearest")[0], masks[0])
    d_dem = dice(warp_masks(moving_masks, moving, dem.transform, fixed, "nearest")[0], masks[0])
    assert d_dem > d_aff and d_dem >= 0.97
    assert dem.jacobian["min"] > 0 and dem.metrics["metric_final"] < dem.metrics["metric_affine"]


def test_warp_masks_nearest_keeps_masks_and_linear_is_soft():
    lab = np.zeros((40, 30), np.int16)
    lab[5:20, 4:12] = 3
    lab[22:35, 10:25] = 7
    lab[10:14, 20:28] = 12
    masks = np.stack([lab == v for v in (3, 7, 12)])
    img = to_sitk(lab.astype(np.float32))
    ident = warp_masks(masks, img, sitk.AffineTransform(2), img, "nearest")
    assert ident.dtype == bool
    np.testing.assert_array_equal(ident, masks)
    rot = _affine(2, [[np.cos(0.3), -np.sin(0.3)], [np.sin(0.3), np.cos(0.3)]], (1.3, -0.7), (19.5, 14.5))
    out = warp_masks(masks, img, rot, img, "nearest")
    assert out.any(axis=(1, 2)).all() and not (out.sum(axis=0) > 1).any()  # every label kept, none blended
    soft = warp_masks(np.stack([lab == 3]), img, rot, img, "linear")
    assert soft.dtype == np.float32 and soft.min() >= 0 and soft.max() <= 1
    assert 0 < np.count_nonzero((soft > 0) & (soft < 1))  # partial volume at the edges


def test_jacobian_check_detects_folding_and_measures_scale():
    ref = to_sitk(np.zeros((32, 32), np.float32))
    scale = _affine(2, np.diag([1.5, 2.0]), (0, 0), (0, 0))
    stats = jacobian_stats(scale, ref)
    assert stats["min"] == pytest.approx(3.0) and stats["max"] == pytest.approx(3.0)
    assert stats["folded_fraction"] == 0.0
    # u_x = -2 x inside a band: d(x + u)/dx = -1 there -> folded
    field = np.zeros((32, 32, 2))
    xs = np.arange(32, dtype=float)
    field[:, 10:20, 0] = -2.0 * (xs[None, 10:20] - 10)
    disp = sitk.GetImageFromArray(field, isVector=True)
    fold = sitk.DisplacementFieldTransform(sitk.Cast(disp, sitk.sitkVectorFloat64))
    stats = jacobian_stats(fold, ref)
    assert stats["min"] < 0 and stats["folded_fraction"] > 0.2


def test_anti_correlated_images_are_rejected_not_accepted():
    fixed_arr, _ = _phantom(64)
    fixed = to_sitk(fixed_arr)
    inverted = to_sitk(1.0 - fixed_arr)  # ITK's correlation metric has an optimum at NCC = -1
    res = register(fixed, inverted, RegistrationSettings(method="demons", max_size=None))
    assert res.status == "failed" and res.method == "none"
    assert any("anti-correlated" in r for r in res.reasons)
    assert [a["settings"] for a in res.attempts] == ["default", "safer"]
    np.testing.assert_array_equal(affine_matrix(res.transform)[0], np.eye(2))


def test_settings_validation_and_safer():
    with pytest.raises(ValueError, match="seed must be >= 1"):
        RegistrationSettings(seed=0)
    with pytest.raises(ValueError, match="method must be one of"):
        RegistrationSettings(method="syn")
    s = RegistrationSettings().safer()
    assert s.demons_sigma == 10.0 and s.metric == "mattes" and s.learning_rate == 0.25
    assert RegistrationSettings().to_dict()["affine_shrink"] == [4, 2, 1]


def test_3d_synthetic_ct_registration_dice_and_no_folding():
    from medspan.data.synthetic import synth_ct

    def case(seed):
        ct = synth_ct(seed, shape=(48, 48, 48), nodules=0)
        arr = ct["image"].transpose(2, 1, 0)  # (z, y, x) -> (x, y, z)
        masks = np.stack([ct["masks"][s].transpose(2, 1, 0) for s in ("left_lung", "right_lung", "heart")])
        return to_sitk(arr, ct["affine"]), masks

    fixed, f_masks = case(1)
    moving, m_masks = case(2)
    s = RegistrationSettings(method="demons", metric="mattes", init="geometry", max_size=48, sampling=0.2,
                             demons_sigma=1.5, demons_iterations=(30, 15))
    res = register(fixed, moving, s)
    assert res.status in ("ok", "retried") and res.method == "demons"
    assert res.jacobian["min"] > 0 and res.jacobian["folded_fraction"] == 0
    warped = warp_masks(m_masks, moving, res.transform, fixed, "nearest")
    affine_only = warp_masks(m_masks, moving, res.affine, fixed, "nearest")
    d = [dice(warped[i], f_masks[i]) for i in range(3)]
    assert min(d[:2]) >= 0.85 and d[2] >= 0.7
    assert np.mean(d) > np.mean([dice(affine_only[i], f_masks[i]) for i in range(3)])


def test_demons_cc_aligns_edges_under_a_regional_brightness_change():
    """A smooth 'opacity' brightening one side of the moving image: the local-correlation step still aligns."""
    fixed_arr, masks = _phantom(96)
    fixed = to_sitk(fixed_arr)
    field = np.zeros((96, 96, 2))
    x, y = np.meshgrid(np.arange(96), np.arange(96), indexing="ij")
    field[..., 0] = 4.0 * np.exp(-((x - 65) ** 2 + (y - 45) ** 2) / (2 * 15.0**2))
    bulge = sitk.DisplacementFieldTransform(
        sitk.Cast(sitk.GetImageFromArray(field.transpose(1, 0, 2), isVector=True), sitk.sitkVectorFloat64)
    )
    warped = sitk.GetArrayFromImage(warp(fixed, bulge, fixed)).T  # (x, y)
    haze = 0.6 * float(fixed_arr.max()) * np.exp(-((x - 30) ** 2 + (y - 50) ** 2) / (2 * 20.0**2))
    moving = to_sitk(warped + haze)
    moving_masks = warp_masks(masks, fixed, bulge, fixed, "nearest")
    dice_of = {}
    for method in ("demons", "demons_cc"):
        res = register(fixed, moving, RegistrationSettings(method=method, max_size=None))
        assert res.status == "ok" and res.jacobian["min"] > 0
        warped_masks = warp_masks(moving_masks, moving, res.transform, fixed, "nearest")
        dice_of[method] = min(dice(w, m) for w, m in zip(warped_masks, masks))
    # demons follows the haze (intensity differences) and bends the right lung (measured: 0.870);
    # the correlation step pulls the edges back (0.938)
    assert dice_of["demons_cc"] >= 0.93 and dice_of["demons_cc"] > dice_of["demons"] + 0.05, dice_of
