"""Tests of medspan.data.readers and ``medspan info``: exact values for known inputs.

Every DICOM / PNG / NIfTI / MHA file is written by the test into tmp_path from a known array;
pydicom's bundled test files and ../shared/data/real are used when present (skip otherwise).
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")

from monai.data import NibabelReader, PILReader  # noqa: E402
from monai.transforms import LoadImaged  # noqa: E402
from pydicom.dataset import FileDataset, FileMetaDataset  # noqa: E402
from pydicom.pixels import apply_modality_lut  # noqa: E402
from pydicom.uid import (  # noqa: E402
    CTImageStorage,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    generate_uid,
)

from medspan.cli import main as cli_main  # noqa: E402
from medspan.data.readers import (  # noqa: E402
    MedspanReader,
    read_dicom_2d,
    read_dicom_series,
    read_image,
    rgb_to_gray,
    window_to_unit,
)
from medspan.errors import DataError  # noqa: E402

REAL = Path(__file__).resolve().parents[2] / "shared/data/real"
LIDC_CT = REAL / "lidc_idri_ctc_slabs/LIDC-IDRI-0001/ct"
PYDICOM_FILES = Path(pydicom.__file__).parent / "data" / "test_files"


# ----------------------------------------------------------------------------------------------
# helpers that write DICOM files
# ----------------------------------------------------------------------------------------------


def make_ds(
    pixels: np.ndarray,
    *,
    photometric: str = "MONOCHROME2",
    bits_stored: int | None = None,
    slope: float | None = None,
    intercept: float | None = None,
    pixel_spacing: tuple[float, float] | None = None,
    position: tuple[float, float, float] | None = None,
    orientation: tuple[float, ...] | None = None,
    series_uid: str | None = None,
    instance: int = 1,
    modality: str = "CT",
) -> FileDataset:
    """A CT Image Storage dataset holding ``pixels`` (rows, cols), Explicit VR Little Endian."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset("", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = modality
    ds.PatientID = "P001"
    ds.StudyInstanceUID = "1.2.3.4"
    ds.SeriesInstanceUID = series_uid or "1.2.3.4.5"
    ds.InstanceNumber = instance
    bits = bits_stored or pixels.dtype.itemsize * 8
    ds.set_pixel_data(pixels, photometric_interpretation=photometric, bits_stored=bits)
    if slope is not None:
        ds.RescaleSlope = slope
        ds.RescaleIntercept = intercept if intercept is not None else 0
    if pixel_spacing is not None:
        ds.PixelSpacing = list(pixel_spacing)
    if position is not None:
        ds.ImagePositionPatient = [f"{v:.6f}" for v in position]
    if orientation is not None:
        ds.ImageOrientationPatient = [f"{v:.8f}" for v in orientation]
    return ds


def save(ds: FileDataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def _oblique() -> tuple[float, ...]:
    """Row/column directions of an axial plane turned 20 deg about z and 10 deg about x."""
    a, b = np.deg2rad(20), np.deg2rad(10)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    m = rx @ rz
    return tuple(m[:, 0]) + tuple(m[:, 1])


def write_series(
    folder: Path,
    n: int = 5,
    *,
    orientation: tuple[float, ...] = AXIAL,
    gap: float = 2.5,
    origin: tuple[float, float, float] = (-100.0, -80.0, -40.0),
    rows: int = 6,
    cols: int = 8,
    seed: int = 0,
) -> list[np.ndarray]:
    """Write ``n`` slices with shuffled file names and InstanceNumbers; slope 2, intercept -1024.

    Slice k (k-th along the normal) holds stored values ``100 * k + arange(rows*cols)``, so its
    HU are ``2 * stored - 1024``. Returns the stored arrays in spatial order.
    """
    folder.mkdir(parents=True, exist_ok=True)
    iop = np.asarray(orientation, dtype=np.float64)
    normal = np.cross(iop[:3], iop[3:])
    rng = random.Random(seed)
    names = [f"img{i:03d}.dcm" for i in range(n)]
    numbers = list(range(1, n + 1))
    rng.shuffle(names)
    rng.shuffle(numbers)
    stored = []
    for k in range(n):
        pixels = (100 * k + np.arange(rows * cols, dtype=np.uint16)).reshape(rows, cols)
        stored.append(pixels)
        position = tuple(np.asarray(origin) + k * gap * normal)
        ds = make_ds(
            pixels, bits_stored=12, slope=2, intercept=-1024, pixel_spacing=(0.7, 0.7),
            position=position, orientation=orientation, instance=numbers[k],
        )
        save(ds, folder / names[k])
    return stored


# ----------------------------------------------------------------------------------------------
# 2D DICOM: photometric, rescale, VOI, spacing
# ----------------------------------------------------------------------------------------------


def test_monochrome1_unsigned_12bit_is_inverted_exactly(tmp_path: Path) -> None:
    pixels = np.array([[0, 1, 2, 4095], [1000, 2048, 3000, 4094], [7, 8, 9, 10]], dtype=np.uint16)
    path = save(make_ds(pixels, photometric="MONOCHROME1", bits_stored=12), tmp_path / "m1.dcm")
    arr, meta = read_dicom_2d(path)
    assert arr.dtype == np.float32 and arr.shape == (4, 3)  # (x, y) = (cols, rows)
    np.testing.assert_array_equal(arr, (4095 - pixels.astype(np.float32)).T)
    assert meta["photometric_interpretation"] == "MONOCHROME1"
    assert meta["original_dtype"] == "uint16" and meta["bits_stored"] == 12 and meta["voi"] == "none"


def test_monochrome1_signed_and_rescaled_is_inverted_over_the_modality_range(tmp_path: Path) -> None:
    # signed 16-bit: stored range [-32768, 32767] -> inverted value = -1 - v
    pixels = np.array([[-32768, -1, 0], [5, 100, 32767]], dtype=np.int16)
    arr, _ = read_dicom_2d(save(make_ds(pixels, photometric="MONOCHROME1"), tmp_path / "s.dcm"))
    np.testing.assert_array_equal(arr, (-1.0 - pixels.astype(np.float32)).T)
    # unsigned 12-bit, slope 2, intercept -10: modality range [-10, 8180] -> 8170 - (2 v - 10)
    pixels = np.array([[0, 1, 4095], [10, 20, 30]], dtype=np.uint16)
    ds = make_ds(pixels, photometric="MONOCHROME1", bits_stored=12, slope=2, intercept=-10)
    arr, _ = read_dicom_2d(save(ds, tmp_path / "r.dcm"))
    np.testing.assert_array_equal(arr, (8170.0 - (2.0 * pixels - 10)).T.astype(np.float32))


def test_rescale_slope_intercept_applied_exactly(tmp_path: Path) -> None:
    pixels = np.array([[0, 1, 2], [1000, 2000, 4095]], dtype=np.uint16)
    ds = make_ds(pixels, bits_stored=12, slope=0.5, intercept=-100)
    arr, meta = read_dicom_2d(save(ds, tmp_path / "ct.dcm"))
    expected = np.array([[-100.0, 400.0], [-99.5, 900.0], [-99.0, 1947.5]], dtype=np.float32)
    np.testing.assert_array_equal(arr, expected)
    assert meta["modality"] == "CT" and meta["patient_id"] == "P001" and meta["series_instance_uid"] == "1.2.3.4.5"


def test_window_is_applied_only_on_request_with_known_output(tmp_path: Path) -> None:
    hu = np.array([[-1000, -160, -60, 40], [140, 240, 241, 1000]], dtype=np.int16)
    ds = make_ds(hu)
    ds.WindowCenter, ds.WindowWidth = "40.5", "401"  # LINEAR: (x - 40) / 400 + 0.5, clipped to [0, 1]
    path = save(ds, tmp_path / "w.dcm")
    expected = np.array([[0.0, 0.0, 0.25, 0.5], [0.75, 1.0, 1.0, 1.0]], dtype=np.float32).T

    plain, meta = read_dicom_2d(path)
    np.testing.assert_array_equal(plain, hu.T.astype(np.float32))  # no VOI unless asked
    assert meta["voi"] == "none"

    windowed, meta = read_dicom_2d(path, window=(40.5, 401))
    np.testing.assert_array_equal(windowed, expected)
    assert meta["voi"] == "window"

    from_file, meta = read_dicom_2d(path, apply_voi_lut=True)
    np.testing.assert_array_equal(from_file, expected)
    assert meta["voi"] == "file-window"

    # the explicit window wins over the file's
    other, _ = read_dicom_2d(path, apply_voi_lut=True, window=(0.5, 3))  # (x - 0) / 2 + 0.5
    np.testing.assert_array_equal(other, np.array([[0, 0, 0, 1], [1, 1, 1, 1]], dtype=np.float32).T)

    # MONOCHROME1 with VOI: 1 - y
    ds.PhotometricInterpretation = "MONOCHROME1"
    inverted, _ = read_dicom_2d(save(ds, tmp_path / "w1.dcm"), apply_voi_lut=True)
    np.testing.assert_array_equal(inverted, 1.0 - expected)


def test_voi_without_window_in_file_stretches_the_modality_range(tmp_path: Path) -> None:
    pixels = np.array([[0, 1023], [2047, 4095]], dtype=np.uint16)
    arr, meta = read_dicom_2d(save(make_ds(pixels, bits_stored=12), tmp_path / "f.dcm"), apply_voi_lut=True)
    np.testing.assert_allclose(arr, (pixels / 4095.0).T, rtol=0, atol=1e-7)
    assert meta["voi"] == "full-range"


def test_voi_lut_sequence_maps_through_the_lut_to_unit_range(tmp_path: Path) -> None:
    from pydicom.dataset import Dataset

    pixels = np.array([[0, 1, 2], [3, 4, 9]], dtype=np.uint16)
    ds = make_ds(pixels, bits_stored=12)
    item = Dataset()
    item.add_new(0x00283002, "US", [4, 0, 8])  # LUT Descriptor: 4 entries, first input 0, 8-bit
    item.add_new(0x00283006, "US", [0, 51, 102, 255])  # LUT Data
    ds.VOILUTSequence = [item]
    ds.WindowCenter, ds.WindowWidth = "100", "10"  # the LUT wins, as in pydicom
    arr, meta = read_dicom_2d(save(ds, tmp_path / "lut.dcm"), apply_voi_lut=True)
    np.testing.assert_allclose(arr, np.array([[0, 0.2, 0.4], [1, 1, 1]]).T, atol=1e-7)
    assert meta["voi"] == "file-lut"


def test_dicom_without_preamble_is_read(tmp_path: Path) -> None:
    pixels = np.array([[1, 2, 3], [4, 5, 6]], dtype=np.int16)
    ds = make_ds(pixels, slope=1, intercept=-1024)
    path = tmp_path / "legacy"  # no suffix, no preamble, no file meta
    ds.file_meta = FileMetaDataset()  # no file meta: written as a bare implicit VR dataset
    ds.preamble = None
    ds.save_as(path, enforce_file_format=False, implicit_vr=True, little_endian=True)
    assert path.read_bytes()[128:132] != b"DICM"
    arr, _ = read_image(path)
    np.testing.assert_array_equal(arr, (pixels.astype(np.float32) - 1024).T)


def test_window_to_unit_linear_exact_and_sigmoid() -> None:
    x = np.array([-200.0, 39.5, 300.0])
    np.testing.assert_array_equal(window_to_unit(x, 40, 400), [0.0, 0.5, 1.0])
    np.testing.assert_array_equal(window_to_unit(np.array([-10.0, 0.0, 5.0, 20.0]), 0, 20, "LINEAR_EXACT"),
                                  [0.0, 0.5, 0.75, 1.0])
    np.testing.assert_allclose(window_to_unit(np.array([0.0, 10.0]), 0, 40, "SIGMOID"),
                               [0.5, 1 / (1 + np.exp(-1.0))])


def test_pixel_spacing_is_returned_in_x_y_order(tmp_path: Path) -> None:
    pixels = np.arange(15, dtype=np.uint8).reshape(3, 5)
    arr, meta = read_dicom_2d(save(make_ds(pixels, pixel_spacing=(0.5, 0.25)), tmp_path / "a.dcm"))
    assert arr.shape == (5, 3)
    np.testing.assert_array_equal(arr, pixels.T.astype(np.float32))
    np.testing.assert_array_equal(meta["spacing"], [0.25, 0.5])  # PixelSpacing = (row, column)
    assert meta["spacing_source"] == "PixelSpacing"
    np.testing.assert_array_equal(meta["affine"], np.diag([0.25, 0.5, 1.0, 1.0]))

    ds = make_ds(pixels)
    ds.ImagerPixelSpacing = [0.2, 0.1]
    _, meta = read_dicom_2d(save(ds, tmp_path / "b.dcm"))
    np.testing.assert_array_equal(meta["spacing"], [0.1, 0.2])
    assert meta["spacing_source"] == "ImagerPixelSpacing"

    _, meta = read_dicom_2d(save(make_ds(pixels), tmp_path / "c.dcm"))
    np.testing.assert_array_equal(meta["spacing"], [1.0, 1.0])
    assert meta["spacing_source"] == "default"


# ----------------------------------------------------------------------------------------------
# pydicom's bundled files and compressed transfer syntaxes
# ----------------------------------------------------------------------------------------------


def _testdata(name: str) -> Path:
    path = PYDICOM_FILES / name
    if not path.is_file():
        pytest.skip(f"{name} is not bundled with this pydicom")
    return path


@pytest.mark.parametrize(
    "name",
    [
        "CT_small.dcm",  # explicit VR, rescale -1024
        "MR_small.dcm",
        "MR_small_RLE.dcm",
        "MR_small_jpeg_ls_lossless.dcm",
        "MR_small_jp2klossless.dcm",
        "JPEG2000.dcm",
        "693_J2KI.dcm",  # JPEG 2000, 14-bit signed CT with rescale
        "JPEGLSNearLossless_08.dcm",
        "JPEGLSNearLossless_16.dcm",
        "JPGExtended.dcm",  # JPEG extended, 12-bit
    ],
)
def test_pydicom_testdata_matches_pixel_array_and_modality_lut(name: str) -> None:
    path = _testdata(name)
    ds = pydicom.dcmread(path)
    expected = np.asarray(apply_modality_lut(ds.pixel_array, ds), dtype=np.float32).T
    arr, meta = read_image(path)
    assert arr.dtype == np.float32
    np.testing.assert_array_equal(arr, expected)
    assert meta["photometric_interpretation"] == ds.PhotometricInterpretation
    if "PixelSpacing" in ds:
        np.testing.assert_array_equal(meta["spacing"], [float(ds.PixelSpacing[1]), float(ds.PixelSpacing[0])])


def test_lossless_compressed_mr_equals_uncompressed() -> None:
    reference, _ = read_image(_testdata("MR_small.dcm"))
    for name in ("MR_small_RLE.dcm", "MR_small_jpeg_ls_lossless.dcm", "MR_small_jp2klossless.dcm"):
        arr, _ = read_image(_testdata(name))
        np.testing.assert_array_equal(arr, reference)


def test_ct_small_is_in_hounsfield_units() -> None:
    path = _testdata("CT_small.dcm")
    ds = pydicom.dcmread(path)
    arr, meta = read_dicom_2d(path)
    assert arr.shape == (ds.Columns, ds.Rows) == (128, 128)
    assert arr[5, 3] == float(ds.pixel_array[3, 5]) - 1024.0
    assert meta["modality"] == "CT"


@pytest.mark.parametrize("name", ["SC_rgb_jpeg.dcm", "SC_rgb_jpeg_dcmd.dcm"])
def test_rgb_dicom_becomes_gray_with_a_flag_or_stays_rgb(name: str) -> None:
    path = _testdata(name)
    rgb = pydicom.dcmread(path).pixel_array  # (rows, cols, 3), RGB
    gray, meta = read_dicom_2d(path)
    expected = (rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114])).astype(np.float32).T
    np.testing.assert_array_equal(gray, expected)
    assert meta["rgb_to_gray"] is True
    colour, meta = read_dicom_2d(path, rgb_to_gray=False)
    np.testing.assert_array_equal(colour, np.moveaxis(rgb, 0, 1).astype(np.float32))
    assert meta["rgb_to_gray"] is False and meta["original_channel_dim"] == -1


def test_rgb_to_gray_keeps_grey_stored_as_rgb_exact() -> None:
    grey = np.array([[0, 17], [200, 255]], dtype=np.uint8)
    out = rgb_to_gray(np.stack([grey] * 3, axis=-1))
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, grey)


def _encoder_or_skip(uid: str) -> None:
    from pydicom.pixels import get_encoder

    try:
        encoder = get_encoder(uid)
    except Exception as e:  # pragma: no cover - depends on the install
        pytest.skip(f"no encoder for {uid}: {e}")
    if not encoder.is_available:
        pytest.skip(f"no encoder plugin for {uid.name}: {encoder.missing_dependencies}")


@pytest.mark.parametrize("uid", [JPEGLSLossless, JPEG2000Lossless], ids=["jpegls", "jpeg2000"])
@pytest.mark.parametrize(
    "dtype,bits,photometric",
    [(np.uint8, 8, "MONOCHROME2"), (np.uint16, 16, "MONOCHROME2"), (np.uint16, 12, "MONOCHROME1")],
)
def test_written_lossless_compressed_reads_back_exactly(tmp_path: Path, uid, dtype, bits, photometric) -> None:
    _encoder_or_skip(uid)
    rng = np.random.default_rng(3)
    pixels = rng.integers(0, 2**bits, size=(48, 33), dtype=np.int64).astype(dtype)
    pixels[0, 0], pixels[-1, -1] = 0, 2**bits - 1
    ds = make_ds(pixels, photometric=photometric, bits_stored=bits)
    ds.compress(uid)
    path = save(ds, tmp_path / "c.dcm")
    assert pydicom.dcmread(path).file_meta.TransferSyntaxUID == uid
    arr, _ = read_dicom_2d(path)
    expected = pixels.astype(np.float64)
    if photometric == "MONOCHROME1":
        expected = (2**bits - 1) - expected
    np.testing.assert_array_equal(arr, expected.T.astype(np.float32))


# ----------------------------------------------------------------------------------------------
# broken inputs
# ----------------------------------------------------------------------------------------------


def test_truncated_dicom_raises_data_error_naming_the_file(tmp_path: Path) -> None:
    pixels = np.arange(64 * 64, dtype=np.uint16).reshape(64, 64)
    whole = save(make_ds(pixels, slope=1, intercept=-1024), tmp_path / "whole.dcm").read_bytes()
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(DataError, match="truncated DICOM file: 3.* bytes of pixel data, expected 8192") as info:
        read_image(cut)
    assert str(cut) in str(info.value)
    header_only = tmp_path / "header.dcm"
    header_only.write_bytes(whole[: whole.index(b"\xe0\x7f\x10\x00")])  # cut before (7FE0,0010)
    with pytest.raises(DataError, match="no pixel data") as info:
        read_image(header_only)
    assert str(header_only) in str(info.value)


def test_truncated_slice_in_a_series_raises_naming_the_slice(tmp_path: Path) -> None:
    folder = tmp_path / "ct"
    write_series(folder, n=4)
    victim = sorted(folder.iterdir())[1]
    whole = victim.read_bytes()
    victim.write_bytes(whole[:-10])
    with pytest.raises(DataError, match="truncated DICOM file") as info:
        read_dicom_series(folder)
    assert info.value.where == str(victim)
    victim.write_bytes(whole[: whole.index(b"\xe0\x7f\x10\x00")])  # header kept, pixels gone
    with pytest.raises(DataError, match="no pixel data") as info:
        read_dicom_series(folder)
    assert info.value.where == str(victim)


def test_non_dicom_with_dcm_suffix_raises_data_error_naming_the_file(tmp_path: Path) -> None:
    fake = tmp_path / "fake.dcm"
    fake.write_text("this is not a DICOM file\n" * 20)
    with pytest.raises(DataError, match="not a DICOM file") as info:
        read_image(fake)
    assert str(fake) in str(info.value) and info.value.where == str(fake)


def test_missing_pixel_data_and_undecodable_pixels_raise_data_error(tmp_path: Path) -> None:
    ds = make_ds(np.zeros((2, 2), dtype=np.uint8))
    del ds.PixelData
    path = save(ds, tmp_path / "nopix.dcm")
    with pytest.raises(DataError, match="no pixel data") as info:
        read_image(path)
    assert str(path) in str(info.value)
    lossy = _testdata("JPEG-lossy.dcm")  # a JPEG stream no available decoder accepts
    with pytest.raises(DataError, match="cannot decode pixel data") as info:
        read_image(lossy)
    assert str(lossy) in str(info.value)


def test_missing_file_raises_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        read_image(tmp_path / "nothing.dcm")


# ----------------------------------------------------------------------------------------------
# DICOM series
# ----------------------------------------------------------------------------------------------


def _sitk_ras_affine(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """Affine (RAS) and (x, y, z) array of SimpleITK's ImageSeriesReader on ``folder``."""
    sitk = pytest.importorskip("SimpleITK")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    image = reader.Execute()
    lps = np.eye(4)
    lps[:3, :3] = np.asarray(image.GetDirection()).reshape(3, 3) @ np.diag(image.GetSpacing())
    lps[:3, 3] = image.GetOrigin()
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps, sitk.GetArrayFromImage(image).transpose(2, 1, 0)


@pytest.mark.parametrize("orientation", [AXIAL, _oblique()], ids=["axial", "oblique"])
def test_series_in_hu_sorted_by_position_with_itk_affine(tmp_path: Path, orientation) -> None:
    folder = tmp_path / "ct"
    stored = write_series(folder, orientation=orientation)
    (folder / "README.txt").write_text("not a DICOM file")
    arr, meta = read_dicom_series(folder)
    assert arr.shape == (8, 6, 5) and arr.dtype == np.float32  # (x, y, z)
    expected = np.stack([2.0 * s - 1024.0 for s in stored], axis=-1).transpose(1, 0, 2)
    np.testing.assert_array_equal(arr, expected)
    np.testing.assert_allclose(meta["spacing"], [0.7, 0.7, 2.5], atol=1e-5)
    assert meta["n_slices"] == 5 and meta["n_ignored_files"] == 1
    assert meta["filename_or_obj"] == str(folder)

    itk_affine, itk_array = _sitk_ras_affine(folder)
    np.testing.assert_allclose(meta["affine"], itk_affine, atol=1e-4)
    np.testing.assert_array_equal(meta["original_affine"], meta["affine"])
    np.testing.assert_allclose(arr, itk_array)


def test_series_from_a_list_of_files_and_through_load_imaged(tmp_path: Path) -> None:
    folder = tmp_path / "ct"
    stored = write_series(folder, n=3, seed=1)
    files = sorted(folder.iterdir(), reverse=True)
    arr, meta = read_dicom_series(files)
    np.testing.assert_array_equal(arr[..., 0], (2.0 * stored[0] - 1024.0).T)
    out = LoadImaged(keys="image", reader=MedspanReader())({"image": str(folder)})["image"]
    assert tuple(out.shape) == (8, 6, 3)
    np.testing.assert_array_equal(out.numpy(), arr)
    np.testing.assert_allclose(out.affine.numpy(), meta["affine"])
    np.testing.assert_allclose(out.pixdim.numpy(), [0.7, 0.7, 2.5], atol=1e-5)


def test_series_with_a_missing_slice_raises(tmp_path: Path) -> None:
    folder = tmp_path / "gap"
    write_series(folder)
    middle = sorted(folder.iterdir(), key=lambda f: float(pydicom.dcmread(f).ImagePositionPatient[2]))[2]
    middle.unlink()
    with pytest.raises(DataError, match="inconsistent slice gaps") as info:
        read_dicom_series(folder)
    assert info.value.where == str(folder)


def test_series_with_mixed_orientation_raises(tmp_path: Path) -> None:
    folder = tmp_path / "mixed"
    write_series(folder)
    one = sorted(folder.iterdir())[1]
    ds = pydicom.dcmread(one)
    ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
    ds.save_as(one)
    with pytest.raises(DataError, match="mixed orientation") as info:
        read_dicom_series(folder)
    assert info.value.where == str(folder)


def test_two_series_in_one_folder_raise_naming_both_uids(tmp_path: Path) -> None:
    folder = tmp_path / "two"
    write_series(folder, n=3)
    ds = make_ds(np.zeros((6, 8), dtype=np.uint16), position=(0, 0, 0), orientation=AXIAL, series_uid="9.9.9")
    save(ds, folder / "other.dcm")
    with pytest.raises(DataError, match="2 DICOM series") as info:
        read_dicom_series(folder)
    assert info.value.where == str(folder)
    assert "1.2.3.4.5" in str(info.value) and "9.9.9" in str(info.value)
    # LoadImage must not hide the error by falling back to MONAI's default readers
    with pytest.raises(DataError, match="2 DICOM series"):
        LoadImaged(keys="image", reader=MedspanReader())({"image": str(folder)})


def test_series_with_duplicated_position_or_mixed_size_raises(tmp_path: Path) -> None:
    folder = tmp_path / "dup"
    write_series(folder, n=3)
    first = sorted(folder.iterdir())[0]
    ds = pydicom.dcmread(first)
    ds.SOPInstanceUID = generate_uid()
    ds.save_as(folder / "copy.dcm")
    with pytest.raises(DataError, match="duplicated slice position") as info:
        read_dicom_series(folder)
    assert info.value.where == str(folder)

    folder = tmp_path / "size"
    write_series(folder, n=3)
    save(make_ds(np.zeros((4, 4), dtype=np.uint16), position=(-100, -80, 0), orientation=AXIAL), folder / "x.dcm")
    with pytest.raises(DataError, match="rows x columns"):
        read_dicom_series(folder)


@pytest.mark.real_data
def test_real_lidc_slab_reads_in_hu_in_position_order() -> None:
    if not LIDC_CT.is_dir():
        pytest.skip(f"real data absent: {LIDC_CT}")
    arr, meta = read_image(LIDC_CT)
    assert arr.shape == (512, 512, 16) and arr.dtype == np.float32
    assert arr.min() <= -900 and -1100 <= float(np.median(arr[:, :, 8])) <= 100
    np.testing.assert_allclose(meta["spacing"], [0.703125, 0.703125, 2.5], atol=1e-6)
    assert meta["modality"] == "CT" and meta["n_slices"] == 16
    # slice k lies at z = -132.5 + 2.5 k (the files name their z); InstanceNumber runs the other way
    for k in (0, 7, 15):
        ds = pydicom.dcmread(LIDC_CT / f"{-132.5 + 2.5 * k:.6f}.dcm")
        assert float(ds.ImagePositionPatient[2]) == pytest.approx(-132.5 + 2.5 * k)
        hu = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        np.testing.assert_array_equal(arr[:, :, k], hu.T)
    itk_affine, _ = _sitk_ras_affine(LIDC_CT)
    np.testing.assert_allclose(meta["affine"], itk_affine, atol=1e-4)
    assert meta["affine"][2, 3] == pytest.approx(-132.5)


def _load(reader, path):
    return LoadImaged(keys="image", reader=reader)({"image": path})["image"]


@pytest.mark.real_data
def test_real_cxr_jpeg_and_png_match_pil_reader() -> None:
    jpgs = sorted((REAL / "mhh_covid_cxr_v7_lungs/images").glob("*.jpg"))[:1]
    pngs = sorted((REAL / "nih_cxr14_subset/fullres").glob("*.png"))[:1]
    if not jpgs and not pngs:
        pytest.skip(f"real CXR data absent under {REAL}")
    for path in jpgs + pngs:
        ours, theirs = _load(MedspanReader(), str(path)), _load(PILReader(), str(path))
        assert ours.shape == theirs.shape
        np.testing.assert_array_equal(ours.numpy(), theirs.numpy())
    if jpgs:
        assert tuple(_load(MedspanReader(), str(jpgs[0])).shape) == (2000, 2000)


# ----------------------------------------------------------------------------------------------
# PNG / NIfTI / MHA through LoadImaged
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_png_through_medspan_reader_equals_pil_reader(tmp_path: Path, dtype) -> None:
    from PIL import Image

    top = np.iinfo(dtype).max
    pixels = np.linspace(0, top, 7 * 5).astype(dtype).reshape(7, 5)
    path = tmp_path / f"img_{np.dtype(dtype).name}.png"
    Image.fromarray(pixels).save(path)
    ours, theirs = _load(MedspanReader(), str(path)), _load(PILReader(), str(path))
    assert ours.shape == theirs.shape == (5, 7) and ours.dtype == theirs.dtype
    np.testing.assert_array_equal(ours.numpy(), theirs.numpy())
    np.testing.assert_array_equal(ours.numpy(), pixels.T.astype(np.float32))
    np.testing.assert_array_equal(ours.affine.numpy(), theirs.affine.numpy())
    raw, meta = read_image(path)
    assert raw.dtype == dtype and meta["original_dtype"] == np.dtype(dtype).name


def test_png_mask_list_stacks_as_channels_like_pil_reader(tmp_path: Path) -> None:
    from PIL import Image

    paths = []
    for c in range(3):
        mask = np.zeros((6, 9), dtype=np.uint8)
        mask[c : c + 2, 2 * c : 2 * c + 3] = 255
        paths.append(str(tmp_path / f"mask{c}.png"))
        Image.fromarray(mask).save(paths[-1])
    ours, theirs = _load(MedspanReader(), paths), _load(PILReader(), paths)
    assert ours.shape == theirs.shape == (3, 9, 6)
    np.testing.assert_array_equal(ours.numpy(), theirs.numpy())
    assert ours.meta["original_channel_dim"] == theirs.meta["original_channel_dim"] == 0
    assert ours.meta["filename_or_obj"] == paths[0]


def test_rgb_png_is_gray_with_flag_or_matches_pil_reader_when_kept(tmp_path: Path) -> None:
    from PIL import Image

    rgb = np.zeros((4, 3, 3), dtype=np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 100, 50, 200
    path = tmp_path / "rgb.png"
    Image.fromarray(rgb).save(path)
    gray, meta = read_image(path)
    assert gray.shape == (3, 4) and meta["rgb_to_gray"] is True
    np.testing.assert_allclose(gray, 0.299 * 100 + 0.587 * 50 + 0.114 * 200, rtol=1e-6)
    kept = _load(MedspanReader(rgb_to_gray=False), str(path))
    np.testing.assert_array_equal(kept.numpy(), _load(PILReader(), str(path)).numpy())


def test_mismatched_shapes_in_a_channel_list_raise(tmp_path: Path) -> None:
    from PIL import Image

    a, b = tmp_path / "a.png", tmp_path / "b.png"
    Image.fromarray(np.zeros((4, 4), dtype=np.uint8)).save(a)
    Image.fromarray(np.zeros((4, 5), dtype=np.uint8)).save(b)
    with pytest.raises(DataError, match="cannot stack") as info:
        _load(MedspanReader(), [str(a), str(b)])
    assert info.value.where == str(b)


def test_nifti_round_trips_with_its_affine(tmp_path: Path) -> None:
    nib = pytest.importorskip("nibabel")
    data = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    affine = np.array([[-0.8, 0, 0, 10.0], [0, 0.8, 0.1, -20.0], [0, 0, 2.5, 30.0], [0, 0, 0, 1]])
    path = tmp_path / "vol.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), path)
    arr, meta = read_image(path)
    np.testing.assert_array_equal(arr, data.astype(np.float32))
    np.testing.assert_allclose(meta["affine"], affine, atol=1e-6)
    np.testing.assert_allclose(meta["spacing"], np.sqrt((affine[:3, :3] ** 2).sum(0)), atol=1e-6)
    ours, theirs = _load(MedspanReader(), str(path)), _load(NibabelReader(), str(path))
    np.testing.assert_array_equal(ours.numpy(), theirs.numpy())
    np.testing.assert_allclose(ours.affine.numpy(), theirs.affine.numpy(), atol=1e-6)


@pytest.mark.parametrize("suffix", [".mha", ".nrrd"])
def test_itk_formats_have_ras_affine(tmp_path: Path, suffix: str) -> None:
    sitk = pytest.importorskip("SimpleITK")
    data_zyx = np.arange(3 * 4 * 5, dtype=np.int16).reshape(3, 4, 5)
    image = sitk.GetImageFromArray(data_zyx)
    image.SetSpacing((0.5, 0.75, 2.0))
    image.SetOrigin((1.0, 2.0, 3.0))
    image.SetDirection((0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0))
    path = tmp_path / f"vol{suffix}"
    sitk.WriteImage(image, str(path))
    arr, meta = read_image(path)
    np.testing.assert_array_equal(arr, data_zyx.transpose(2, 1, 0))
    expected = np.array([[0, -0.75, 0, -1.0], [-0.5, 0, 0, -2.0], [0, 0, 2.0, 3.0], [0, 0, 0, 1]])
    np.testing.assert_allclose(meta["affine"], expected)
    np.testing.assert_allclose(meta["spacing"], [0.5, 0.75, 2.0])


def test_dicom_through_load_imaged_and_by_name(tmp_path: Path) -> None:
    pixels = np.array([[0, 1, 2], [3, 4, 4095]], dtype=np.uint16)
    ds = make_ds(pixels, photometric="MONOCHROME1", bits_stored=12, pixel_spacing=(0.2, 0.1))
    path = str(save(ds, tmp_path / "cr.dcm"))
    expected = (4095.0 - pixels.T).astype(np.float32)
    out = _load(MedspanReader(), path)
    np.testing.assert_array_equal(out.numpy(), expected)
    np.testing.assert_allclose(out.affine.numpy(), np.diag([0.1, 0.2, 1.0, 1.0]))
    out = _load("medspan.data.readers.MedspanReader", path)  # dotted name, as LoadImage resolves it
    np.testing.assert_array_equal(out.numpy(), expected)

    from monai.bundle import ConfigParser

    parser = ConfigParser(
        {
            "imports": ["$import medspan", "$import medspan.data.readers"],
            "load": {
                "_target_": "LoadImaged",
                "keys": ["image"],
                "reader": "$medspan.data.readers.MedspanReader(window=[4095, 4095])",
            },
        }
    )
    parser.get_parsed_content("imports")
    out = parser.get_parsed_content("load")({"image": path})["image"]
    # the window acts on the stored (modality) values, then MONOCHROME1 inverts: 1 - y
    expected = 1.0 - window_to_unit(pixels.T.astype(np.float64), 4095, 4095)
    np.testing.assert_allclose(out.numpy(), expected, atol=1e-7)
    assert out.numpy()[0, 0] == 1.0 and out.numpy()[2, 1] == np.float32(1.0 - 0.5 / 4094 - 0.5)


def test_verify_suffix(tmp_path: Path) -> None:
    reader = MedspanReader()
    assert reader.verify_suffix(["a.png", "b.nii.gz", "c.dcm", "d.mha", str(tmp_path)])
    assert not reader.verify_suffix("notes.txt")


# ----------------------------------------------------------------------------------------------
# medspan info
# ----------------------------------------------------------------------------------------------


def test_info_cli_prints_shape_spacing_range(tmp_path: Path, capsys) -> None:
    pixels = np.array([[0, 10, 20], [30, 40, 4095]], dtype=np.uint16)
    ds = make_ds(pixels, bits_stored=12, slope=1, intercept=-1024, pixel_spacing=(0.5, 0.25))
    path = save(ds, tmp_path / "ct.dcm")
    assert cli_main(["info", str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        f"path:        {path}",
        "reader:      pydicom",
        "shape:       (3, 2)  (MONAI order x, y)",
        "dtype:       float32 (stored as uint16)",
        "spacing:     0.25 x 0.5 mm (PixelSpacing)",
        "range:       -1024 .. 3071 (mean -324.833)",
        "non-finite:  0 NaN, 0 infinite voxels",
        "dicom:       CT, MONOCHROME2",
    ]
    assert cli_main(["info", str(path), "--window", "0", "2000"]) == 0
    out = capsys.readouterr().out
    assert "range:       0 .. 1 (mean" in out and "voi:         window" in out

    assert cli_main(["info", str(tmp_path / "missing.dcm")]) == 1
    assert f"{tmp_path / 'missing.dcm'}: file or folder does not exist" in capsys.readouterr().err
