"""Tests of medspan.data.transforms (exact values, shapes, alignment and error messages)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from medspan.data.transforms import (
    CTIntensity,
    CTIntensityd,
    CXRNormalize,
    CXRNormalized,
    Standardize2D,
    Standardize2Dd,
    Standardize3D,
    Standardize3Dd,
    check_channel_first,
)
from medspan.errors import DataError

REAL = Path(__file__).resolve().parents[2] / "shared/data/real"


def meta_image(array: np.ndarray, spacing: tuple[float, ...] | None = None, name: str = "/data/img.png") -> MetaTensor:
    nd = array.ndim - 1
    diag = list(spacing or (1.0,) * nd) + [1.0] * (4 - nd)
    return MetaTensor(torch.as_tensor(array), affine=torch.diag(torch.tensor(diag, dtype=torch.float64)),
                      meta={"filename_or_obj": name})


# ------------------------------------------------------------------------------- CT


HU = [-2000.0, -1000.0, -650.0, -300.0, 50.0, 400.0, 1000.0]
SCALED = [0.0, 0.0, 0.25, 0.5, 0.75, 1.0, 1.0]


def test_ct_window_known_values_numpy_torch_meta() -> None:
    x = np.array(HU, np.float32).reshape(1, 7, 1)
    out = CTIntensity()(x)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32
    np.testing.assert_allclose(out.ravel(), SCALED, atol=1e-7)
    out_t = CTIntensity()(torch.tensor(HU, dtype=torch.int16).reshape(1, 7, 1, 1))  # 3D, integer HU
    assert out_t.dtype == torch.float32 and out_t.shape == (1, 7, 1, 1)
    np.testing.assert_allclose(out_t.ravel().numpy(), SCALED, atol=1e-7)
    m = meta_image(x, name="/ct/a.nii.gz")
    out_m = CTIntensity(b_min=-1.0, b_max=1.0)(m)
    assert isinstance(out_m, MetaTensor) and out_m.meta["filename_or_obj"] == "/ct/a.nii.gz"
    np.testing.assert_allclose(out_m.ravel().numpy(), [2 * v - 1 for v in SCALED], atol=1e-6)
    no_clip = CTIntensity(clip=False)(np.array([[[-1700.0, 1100.0]]], np.float32))
    np.testing.assert_allclose(no_clip.ravel(), [-0.5, 1.5], atol=1e-7)


def test_ct_rejects_other_modality() -> None:
    x = meta_image(np.zeros((1, 4, 4, 2), np.float32) - 500, name="/mr/t1.nii.gz")
    x.meta["Modality"] = "MR"
    with pytest.raises(DataError) as err:
        CTIntensity()(x)
    assert str(err.value) == "/mr/t1.nii.gz: CTIntensity expects a CT image, but the meta-data says Modality 'MR'"
    # dict version, modality in a meta dict, pydicom JSON style
    d = {"image": np.zeros((1, 4, 4), np.float32),
         "image_meta_dict": {"filename_or_obj": "/x/cr.dcm", "00080060": {"vr": "CS", "Value": ["CR"]}}}
    with pytest.raises(DataError, match=r"^/x/cr\.dcm \(key 'image'\): CTIntensity expects a CT image.*'CR'"):
        CTIntensityd(keys="image")(d)
    x.meta["Modality"] = "CT"
    assert float(CTIntensity()(x).max()) == pytest.approx(500 / 1400)


def test_ct_strict_rejects_8bit_pictures() -> None:
    pic = meta_image(np.arange(256, dtype=np.uint8).reshape(1, 16, 16), name="/png/photo.png")
    with pytest.raises(DataError) as err:
        CTIntensity(strict=True)(pic)
    assert str(err.value).startswith("/png/photo.png: CTIntensity: values span 0..255 (dtype torch.uint8) with no negatives")
    with pytest.raises(DataError, match="looks like an 8-bit picture"):
        CTIntensity(strict=True)(np.linspace(0, 1, 16, dtype=np.float32).reshape(1, 4, 4))
    assert CTIntensity(strict=False)(pic).shape == (1, 16, 16)  # allowed when not strict
    hu = CTIntensity(strict=True)(np.array(HU, np.float32).reshape(1, 7, 1))
    np.testing.assert_allclose(hu.ravel(), SCALED, atol=1e-7)


def test_ct_nan_names_file() -> None:
    x = meta_image(np.array([[[0.0, np.nan], [1.0, np.inf]]], np.float32), name="/ct/bad.nii.gz")
    with pytest.raises(DataError, match=r"^/ct/bad\.nii\.gz: CTIntensity: the image has 1 NaN and 1 infinite values$"):
        CTIntensity()(x)


# ------------------------------------------------------------------------------- CXR


def test_cxr_percentiles_on_a_ramp() -> None:
    ramp = np.arange(1001, dtype=np.uint16).reshape(1, 1001, 1)  # 0..1000: p0.5 = 5, p99.5 = 995
    out = CXRNormalize()(ramp)
    assert out.dtype == np.float32 and out.shape == (1, 1001, 1)
    np.testing.assert_allclose(out[0, [0, 5, 500, 995, 1000], 0], [0.0, 0.0, 0.5, 1.0, 1.0], atol=1e-6)
    np.testing.assert_allclose(out[0, 250, 0], 245 / 990, atol=1e-6)
    # 8-bit ramp 0..200 with 10/90 percentiles: lo 20, hi 180
    ramp8 = torch.arange(201, dtype=torch.uint8).reshape(1, 3, 67)
    out8 = CXRNormalize(lower=10, upper=90)(ramp8)
    assert out8.dtype == torch.float32
    np.testing.assert_allclose(out8.ravel()[[0, 20, 100, 180, 200]].numpy(), [0, 0, 0.5, 1, 1], atol=1e-6)
    # gamma after the window
    g = CXRNormalize(lower=10, upper=90, gamma=2.0)(ramp8)
    np.testing.assert_allclose(float(g.ravel()[100]), 0.25, atol=1e-6)


def test_cxr_constant_image_gives_zeros_and_keeps_meta() -> None:
    for value, dtype in ((4095, np.uint16), (0, np.uint8), (0.3, np.float32)):
        x = meta_image(np.full((1, 8, 6), value, dtype), name="/cxr/flat.png")
        out = CXRNormalize()(x)
        assert isinstance(out, MetaTensor) and out.meta["filename_or_obj"] == "/cxr/flat.png"
        assert torch.equal(out.as_tensor(), torch.zeros(1, 8, 6))


def test_cxr_nan_and_channels_errors() -> None:
    x = np.ones((1, 4, 4), np.float32)
    x[0, 1, 2] = np.nan
    d = {"image": x, "image_meta_dict": {"filename_or_obj": "/cxr/nan.png"}}
    with pytest.raises(DataError) as err:
        CXRNormalized(keys="image")(d)
    assert str(err.value) == "/cxr/nan.png (key 'image'): CXRNormalize: the image has 1 NaN and 0 infinite values"
    rgb = meta_image(np.zeros((3, 4, 4), np.uint8), name="/cxr/rgb.png")
    with pytest.raises(DataError) as err:
        CXRNormalize()(rgb)
    assert str(err.value) == (
        "/cxr/rgb.png: CXRNormalize expects 1 channel(s), shape (1, x, y), got shape (3, 4, 4) (3 channels)"
    )
    out = CXRNormalize(num_channels=None, lower=0, upper=100)(np.stack([np.arange(4.0), np.arange(4.0) * 10])[:, :, None])
    np.testing.assert_allclose(out[:, :, 0], [[0, 1 / 3, 2 / 3, 1]] * 2, atol=1e-6)  # channel-wise


# ------------------------------------------------------------------------------- input validation


def test_wrong_shape_names_file_and_shapes() -> None:
    x = MetaTensor(torch.zeros(100, 50), meta={"filename_or_obj": "/data/cxr_0001.png"})
    with pytest.raises(DataError) as err:
        Standardize2D()(x)
    assert str(err.value) == (
        "/data/cxr_0001.png: Standardize2D expects a channel-first array (C, x, y), got shape (100, 50) "
        "(add EnsureChannelFirstd after LoadImaged)"
    )
    with pytest.raises(DataError, match=r"^/data/cxr_0001\.png: CTIntensity expects a channel-first array "
                                        r"\(C, x, y\) or \(C, x, y, z\), got shape \(100, 50\)"):
        CTIntensity()(x)
    with pytest.raises(DataError, match=r"^<array>: Standardize3D expects a channel-first array \(C, x, y, z\), "
                                        r"got shape \(1, 10, 10\)$"):
        Standardize3D()(np.zeros((1, 10, 10), np.float32))
    with pytest.raises(DataError, match=r"^/d/l\.png \(key 'label'\): Standardize2Dd expects a channel-first"):
        Standardize2Dd(keys=["image", "label"])(
            {"image": np.zeros((1, 4, 4)), "label": np.zeros((4, 4)), "label_meta_dict": {"filename_or_obj": "/d/l.png"}}
        )


def test_non_numeric_dtype() -> None:
    with pytest.raises(DataError, match=r"^<array>: CXRNormalize expects a numeric array \(1, x, y\), got dtype <U1$"):
        CXRNormalize()(np.array([[["a"]]]))
    with pytest.raises(DataError, match="got dtype torch.bool$"):
        CTIntensity()(torch.zeros(1, 2, 2, dtype=torch.bool))
    check_channel_first(np.zeros((1, 2, 2), bool), 2, "m.png", "X", allow_bool=True)  # masks may be bool


# ------------------------------------------------------------------------------- geometry 2D


def test_standardize2d_spacing_then_size() -> None:
    img = meta_image(np.random.default_rng(0).random((1, 100, 50), dtype=np.float32), spacing=(0.5, 1.0))
    # 100 x 0.5 mm, 50 x 1 mm -> 1 mm: 50 x 50
    out = Standardize2D(spacing=1.0, spatial_size=None)(img)
    assert out.shape == (1, 50, 50)
    assert out.pixdim.tolist() == [1.0, 1.0]
    assert out.meta["filename_or_obj"] == "/data/img.png"
    out = Standardize2D(spacing=1.0, spatial_size=64)(img)
    assert out.shape == (1, 64, 64)
    np.testing.assert_allclose(out.pixdim.numpy(), [50 / 64, 50 / 64])
    # no spacing: 100x50 -> aspect-kept 64x32, padded to 64x64 (16 columns each side)
    out = Standardize2D(spatial_size=64, pad_value=-1.0)(np.ones((1, 100, 50), np.float32))
    assert isinstance(out, np.ndarray) and out.shape == (1, 64, 64) and out.dtype == np.float32
    assert np.all(out[0, :, :16] == -1) and np.all(out[0, :, 48:] == -1)
    np.testing.assert_allclose(out[0, :, 16:48], 1.0, atol=1e-6)  # area downsampling: no dark border
    # no aspect: plain resize; pad_crop: centre crop/pad
    assert Standardize2D(spatial_size=(32, 20), keep_aspect=False)(np.ones((1, 100, 50))).shape == (1, 32, 20)
    pc = Standardize2D(spatial_size=(60, 60), size_mode="pad_crop")(np.arange(5000.0).reshape(1, 100, 50))
    assert pc.shape == (1, 60, 60) and pc[0, 0, 5] == 20 * 50 and np.all(pc[0, :, :5] == 0)


def test_standardize2dd_image_and_label_stay_aligned() -> None:
    image = np.zeros((1, 100, 50), np.float32)
    image[0, 40, 10] = 1.0
    label = np.zeros((1, 100, 50), np.uint8)
    label[0, 40, 10] = 1
    data = {
        "image": meta_image(image, spacing=(0.5, 1.0), name="/d/img.dcm"),
        # a PNG mask: its own affine says 1 mm, the image's geometry is used
        "label": meta_image(label, name="/d/mask.png"),
    }
    t = Standardize2Dd(keys=["image", "label"], spacing=1.0, spatial_size=100, mode=("bilinear", "nearest"))
    out = t(data)
    img, lab = out["image"], out["label"]
    assert img.shape == lab.shape == (1, 100, 100)
    assert lab.dtype == torch.uint8 and set(lab.unique().tolist()) == {0, 1}
    # 40 * 0.5 mm = 20 mm -> pixel 20 at 1 mm -> pixels 40..41 after the 2x resize; 10 mm -> 20..21
    expected = [[0, 40, 20], [0, 40, 21], [0, 41, 20], [0, 41, 21]]
    assert (img == img.max()).nonzero().tolist() == expected
    assert lab.nonzero().tolist() == expected
    assert torch.allclose(img.affine, lab.affine)
    assert lab.meta["filename_or_obj"] == "/d/mask.png"
    assert data["label"].pixdim.tolist() == [1.0, 1.0]  # the input was not modified


def test_standardize2dd_padding_alignment_and_prior() -> None:
    image = np.zeros((1, 100, 50), np.float32)
    image[0, 30:40, 10:20] = 1.0
    label = image.astype(bool)
    prior = np.concatenate([image * 0.5, 1 - image])
    t = Standardize2Dd(keys=["image", "label", "prior"], spatial_size=64,
                       mode=("bilinear", "nearest", "bilinear"), pad_value=(0.0, 0, 0.0))
    out = t({"image": image, "label": label, "prior": prior})
    assert out["label"].dtype == np.bool_ and out["prior"].shape == (2, 64, 64)

    def centroid(a: np.ndarray) -> np.ndarray:
        idx = np.indices(a.shape).reshape(2, -1)
        return (idx * a.reshape(-1)).sum(1) / a.sum()

    c_img, c_lab = centroid(out["image"][0]), centroid(out["label"][0].astype(np.float64))
    np.testing.assert_allclose(c_img, c_lab, atol=0.25)
    np.testing.assert_allclose(c_lab, [22.0, 25.0])  # rows 30..39 * 0.64 -> 19..25; cols 16 + 6..12
    np.testing.assert_allclose(out["prior"][0], out["image"][0] * 0.5, atol=1e-6)


def test_standardize2dd_shape_mismatch_between_keys() -> None:
    d = {"image": np.zeros((1, 10, 10)), "label": MetaTensor(torch.zeros(1, 10, 8), meta={"filename_or_obj": "/m.png"})}
    with pytest.raises(DataError) as err:
        Standardize2Dd(keys=["image", "label"])(d)
    assert str(err.value) == (
        "/m.png (key 'label'): Standardize2Dd: spatial shape (10, 8) differs from 'image' (10, 10); "
        "all keys must share the image grid"
    )


# ------------------------------------------------------------------------------- geometry 3D


def test_standardize3d_spacing_and_pad_crop() -> None:
    ct = meta_image(np.zeros((1, 20, 30, 10), np.float32) - 1000, spacing=(3.0, 3.0, 4.0), name="/ct/a.nii.gz")
    lab = np.zeros((1, 20, 30, 10), np.int64)
    lab[0, 11, 15, 5] = 2
    # (20-1)*3/1.5+1 = 39, (30-1)*3/1.5+1 = 59, (10-1)*4/2+1 = 19 -> centre pad/crop to 32^3
    resampled = Standardize3D(spatial_size=None)(ct)
    assert resampled.shape == (1, 39, 59, 19)
    t = Standardize3Dd(keys=["image", "label"], spatial_size=(32, 32, 32), mode=("bilinear", "nearest"),
                       pad_value=(-1000.0, 0))
    out = t({"image": ct, "label": lab})
    assert out["image"].shape == (1, 32, 32, 32) and out["label"].shape == (1, 32, 32, 32)
    assert float(out["image"].min()) == float(out["image"].max()) == -1000.0
    assert isinstance(out["label"], np.ndarray) and out["label"].dtype == np.int64
    assert set(np.unique(out["label"]).tolist()) == {0, 2}
    # voxel (11, 15, 5) -> (22, 30, 10) at the new spacing -> crop offsets (3, 13, -), pad z by 6
    assert np.argwhere(out["label"][0] == 2).tolist() == [[19, 17, 16]]
    np.testing.assert_allclose(out["image"].pixdim.numpy(), [1.5, 1.5, 2.0])


# ------------------------------------------------------------------------------- real data


@pytest.mark.real_data
@pytest.mark.skipif(not (REAL / "lidc_idri_ctc_slabs").is_dir(), reason="needs ../shared/data/real")
def test_real_ct_slice_and_cxr_jpeg() -> None:
    import pydicom
    from PIL import Image

    dcm = sorted((REAL / "lidc_idri_ctc_slabs" / "LIDC-IDRI-0001" / "ct").glob("*.dcm"))[0]
    ds = pydicom.dcmread(dcm)
    hu = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    x = MetaTensor(torch.from_numpy(hu.T[None].copy()), meta={"filename_or_obj": str(dcm), "Modality": ds.Modality})
    out = CTIntensity(strict=True)(x)
    assert out.shape == (1, 512, 512) and float(out.min()) == 0.0 and float(out.max()) == 1.0
    jpg = sorted((REAL / "mhh_covid_cxr_v7_lungs" / "images").glob("*.jpg"))[0]
    with Image.open(jpg) as im:
        cxr = np.asarray(im.convert("L")).T[None].copy()
    cxr_t = MetaTensor(torch.from_numpy(cxr), meta={"filename_or_obj": str(jpg)})
    with pytest.raises(DataError, match=str(jpg.name)):
        CTIntensity(strict=True)(cxr_t)
    norm = CXRNormalize()(cxr_t)
    assert float(norm.min()) == 0.0 and float(norm.max()) == 1.0
    assert Standardize2D(spatial_size=256)(norm).shape == (1, 256, 256)
