"""LIDC-IDRI: CT series + reader XML -> per-reader nodule masks, consensus masks, malignancy, crops.

Input (``--root``), either layout; every ``*.xml`` and every folder of ``*.dcm`` files under the
root (and under ``--xml-dir``, for the separate "LIDC-XML-only" download) is found and the XML is
matched to its CT series by the XML's ``ResponseHeader/SeriesInstanceUid``::

    LIDC-IDRI-0001/<study uid>/<series uid>/*.dcm + 069.xml       (TCIA download)
    LIDC-IDRI-0001/69.xml + LIDC-IDRI-0001/ct/*.dcm                (flat, ../shared/data/real/lidc_idri_ctc_slabs)

The XML (namespace ``http://www.nih.gov``, root ``LidcReadMessage``; ``IdriReadMessage`` files
are chest-radiograph reads and are counted, not used) has one ``readingSession`` per reader; each
``unblindedReadNodule`` has ``characteristics/malignancy`` (1-5) and ``roi`` elements with
``imageZposition``, ``imageSOP_UID``, ``inclusion`` and ``edgeMap`` points (``xCoord`` = column,
``yCoord`` = row). The series is read with :func:`medspan.data.readers.read_dicom_series`
(sorted by position, HU, RAS affine).

Rules (documented choices):

- **ROI -> pixels**: the polygon through the edge points is filled (``skimage.draw.polygon``,
  pixel centres inside) and the edge pixels themselves are added (LIDC outlines are pixel
  chains). On one slice, ``inclusion=FALSE`` rois are subtracted from the union of the
  ``inclusion=TRUE`` rois of the same nodule.
- **ROI -> slice**: by ``imageSOP_UID`` = the slice's SOPInstanceUID, else by ``imageZposition``
  within a quarter of the slice spacing of the slice's z. ROIs on slices not in the series (a
  partial series, e.g. the slabs) are counted (``rois_outside_series``), not errors.
- **Small nodules**: a reader nodule whose rois hold fewer than 3 edge points each (LIDC's
  "< 3 mm" marks: one point, no characteristics) is listed in the case record with its position
  but is not part of the masks, the grouping or the crops. ``nonNodule`` marks are counted.
- **Grouping across readers**: two outlined nodules of *different* readers are the same nodule
  when their pixel sets share at least one voxel (same slice z, same row and column, computed from
  the XML, so also for slices outside the series) or their centroids are at most
  ``--group-distance`` mm (default 5) apart; groups are the connected components of that
  relation. Groups are numbered 1..K by centroid (z, then y, then x, RAS mm, ascending).
- **Consensus**: a voxel belongs to nodule ``k`` when at least 50% of the readers who marked
  nodule ``k`` included it (``2 * count >= n_readers``; one reader: their mask, two: the union,
  four: at least two).
- **Malignancy**: the median of the ratings of the group's annotations (``malignancy_median``,
  may end in .5); classification label ``malignant = median > 3``, ``benign = median < 3``;
  median 3 follows ``--indeterminate`` (``exclude`` by default).
- **Crops**: ``--crop-size`` (64) voxels per axis at ``--crop-spacing`` mm (1.0; 0 = the CT's
  own grid, integer-aligned, no interpolation), axes along the CT's axes, centred on the
  consensus centroid; trilinear for the CT (outside the series: -1024 HU), the nodule's own
  consensus mask sampled trilinearly and thresholded at 0.5.

Outputs (``--out``)::

    images/<case>.nii.gz                      CT, int16 HU (x, y, z), the series' RAS affine
    masks/<case>_reader<r>.nii.gz             uint8 label map of reader r (reading session r, 1-based):
                                              value k = nodule group k
    masks/<case>_consensus.nii.gz             uint8 consensus label map (value k = nodule k)
    crops/<case>_nodule<k>.nii.gz             int16 HU crop; crops/<case>_nodule<k>_mask.nii.gz uint8
    cases/<case>.json                         the case record (readers, nodules, groups, votes, files)
    datalist_seg.json                         image + label (consensus) + reader_labels, per case
    datalist_nodule_cls.json                  classes ["malignant"]; crop image + mask, label 0/1,
                                              malignancy (median), n_readers; for ct_nodule_cls
    report.json / report.txt                  problems and counts

Case ids are the DICOM PatientID (``LIDC-IDRI-0001``); a second CT series of the same patient gets
``_s2``. Validation split by patient (``--val-fraction``). Per-case outputs are written atomically
and the case record last, so a re-run skips finished cases (same settings) without touching them.

Example::

    python -m data_prep.lidc_idri --root ../shared/data/real/lidc_idri_ctc_slabs --out data/lidc
    medspan prepare lidc-idri --root /data/LIDC-IDRI --xml-dir /data/tcia-lidc-xml --out data/lidc --workers 4
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from skimage.draw import polygon

from medspan.data.datalist import split_datalist
from medspan.data.readers import read_dicom_series
from medspan.errors import DataError
from medspan.io import write_json_atomic, write_nifti_atomic

from .common import (
    Report,
    add_common_arguments,
    converter_main,
    is_done,
    run_converter,
    run_items,
)
from .ct_common import (
    crop_grid,
    read_header,
    safe_name,
    sample_on_grid,
    sop_slice_index,
    spacing_of,
    write_datalist_if_changed,
)

__all__ = [
    "NS",
    "Roi",
    "ReaderNodule",
    "LidcRead",
    "parse_lidc_xml",
    "roi_pixels",
    "group_annotations",
    "consensus",
    "discover",
    "convert_case",
    "convert",
    "add_arguments",
    "run",
    "main",
]

NS = "{http://www.nih.gov}"
CHARACTERISTICS = (
    "subtlety",
    "internalStructure",
    "calcification",
    "sphericity",
    "margin",
    "lobulation",
    "spiculation",
    "texture",
    "malignancy",
)
SETTINGS_VERSION = 1


# --------------------------------------------------------------------------------------------
# XML
# --------------------------------------------------------------------------------------------


@dataclass
class Roi:
    """One outline on one slice: ``points`` (n, 2) int as (x = column, y = row)."""

    z: float
    sop_uid: str
    inclusion: bool
    points: np.ndarray


@dataclass
class ReaderNodule:
    """One reader's nodule: ``reader`` is the 1-based reading-session index in the XML."""

    reader: int
    reader_id: str
    nodule_id: str
    characteristics: dict[str, int]
    rois: list[Roi]

    @property
    def outlined(self) -> bool:
        """True for outlined (>= 3 mm) nodules; False for LIDC's point marks of small nodules."""
        return any(len(r.points) >= 3 for r in self.rois)

    @property
    def malignancy(self) -> int | None:
        return self.characteristics.get("malignancy")


@dataclass
class LidcRead:
    """A parsed reader XML: the CT series it annotates and the reading sessions (readers)."""

    path: Path
    series_uid: str
    study_uid: str
    readers: list[str] = field(default_factory=list)
    nodules: list[ReaderNodule] = field(default_factory=list)
    non_nodules: int = 0


def _text(el: ET.Element | None, tag: str, default: str = "") -> str:
    if el is None:
        return default
    child = el.find(NS + tag)
    return default if child is None or child.text is None else child.text.strip()


def _xml_root(path: Path) -> ET.Element:
    try:
        return ET.parse(path).getroot()
    except (ET.ParseError, OSError) as e:
        raise DataError(path, f"cannot parse the reader XML ({type(e).__name__}: {e})") from e


def parse_lidc_xml(path: str | os.PathLike) -> LidcRead:
    """Parse one LIDC reader XML (``LidcReadMessage``).

    Raises:
        DataError: unparsable XML, not a CT read (``IdriReadMessage`` / other root), no
            SeriesInstanceUid, or an roi without a z position / with bad coordinates.

    Example::

        read = parse_lidc_xml("LIDC-IDRI-0001/69.xml")
        len(read.readers), read.nodules[0].malignancy, read.nodules[0].rois[0].z   # 4, 5, -125.0
    """
    path = Path(path)
    root = _xml_root(path)
    if root.tag != NS + "LidcReadMessage":
        raise DataError(path, f"not an LIDC CT read (root element {root.tag.replace(NS, '')})")
    header = root.find(NS + "ResponseHeader")
    series_uid = _text(header, "SeriesInstanceUid")
    if not series_uid:
        raise DataError(path, "no ResponseHeader/SeriesInstanceUid")
    read = LidcRead(path, series_uid, _text(header, "StudyInstanceUID"))
    for r, session in enumerate(root.findall(NS + "readingSession"), start=1):
        read.readers.append(_text(session, "servicingRadiologistID", f"reader{r}"))
        read.non_nodules += len(session.findall(NS + "nonNodule"))
        for nod in session.findall(NS + "unblindedReadNodule"):
            chars: dict[str, int] = {}
            ch = nod.find(NS + "characteristics")
            for name in CHARACTERISTICS:
                value = _text(ch, name)
                if value:
                    try:
                        chars[name] = int(float(value))
                    except ValueError:
                        where = f"nodule {_text(nod, 'noduleID')}"
                        raise DataError(path, f"{where}: {name} is not a number: {value!r}") from None
            rois = []
            for roi in nod.findall(NS + "roi"):
                try:
                    z = float(_text(roi, "imageZposition"))
                    pts = [
                        (int(float(_text(e, "xCoord"))), int(float(_text(e, "yCoord"))))
                        for e in roi.findall(NS + "edgeMap")
                    ]
                except ValueError as e:
                    raise DataError(path, f"nodule {_text(nod, 'noduleID')}: bad roi coordinates ({e})") from None
                inclusion = _text(roi, "inclusion", "TRUE").upper() != "FALSE"
                rois.append(
                    Roi(z, _text(roi, "imageSOP_UID"), inclusion, np.asarray(pts, dtype=np.int64).reshape(-1, 2))
                )
            read.nodules.append(ReaderNodule(r, read.readers[-1], _text(nod, "noduleID"), chars, rois))
    return read


def roi_pixels(points_xy: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Flat pixel indices ``row * cols + col`` of one outline: the filled polygon plus the edge pixels.

    Args:
        points_xy: ``(n, 2)`` edge points as (x = column, y = row).

    Returns:
        sorted unique int64 indices (points outside the image are dropped).

    Example::

        roi_pixels(np.array([[1, 1], [3, 1], [3, 3], [1, 3]]), 5, 5)   # the 3x3 block rows/cols 1..3
    """
    pts = np.asarray(points_xy, dtype=np.int64).reshape(-1, 2)
    rr, cc = (
        polygon(pts[:, 1], pts[:, 0], shape=(rows, cols)) if len(pts) >= 3 else (np.empty(0, int), np.empty(0, int))
    )
    inside = (pts[:, 0] >= 0) & (pts[:, 0] < cols) & (pts[:, 1] >= 0) & (pts[:, 1] < rows)
    rr = np.concatenate([rr, pts[inside, 1]])
    cc = np.concatenate([cc, pts[inside, 0]])
    return np.unique(rr.astype(np.int64) * cols + cc.astype(np.int64))


# --------------------------------------------------------------------------------------------
# geometry of annotations, grouping, consensus
# --------------------------------------------------------------------------------------------


def _zkey(z: float) -> int:
    return int(round(z * 1000.0))  # micrometres


@dataclass
class _Annotation:
    """An outlined reader nodule as pixel sets: per z key, flat indices; plus its centroid."""

    nodule: ReaderNodule
    per_z: dict[int, np.ndarray]
    keys: np.ndarray  # sorted unique z_key * rows * cols + flat
    centroid: np.ndarray  # RAS mm


def _annotation(nod: ReaderNodule, rows: int, cols: int, affine: np.ndarray) -> _Annotation:
    inc: dict[int, list[np.ndarray]] = {}
    exc: dict[int, list[np.ndarray]] = {}
    for roi in nod.rois:
        (inc if roi.inclusion else exc).setdefault(_zkey(roi.z), []).append(roi_pixels(roi.points, rows, cols))
    per_z = {}
    for zk, parts in inc.items():
        pix = np.unique(np.concatenate(parts))
        if zk in exc:
            pix = np.setdiff1d(pix, np.concatenate(exc[zk]), assume_unique=False)
        if pix.size:
            per_z[zk] = pix
    n = rows * cols
    keys = np.sort(np.concatenate([zk * n + p for zk, p in per_z.items()])) if per_z else np.empty(0, np.int64)
    if per_z:
        allp = np.concatenate(list(per_z.values()))
        zs = np.concatenate([np.full(p.size, zk / 1000.0) for zk, p in per_z.items()])
        r, c = allp // cols, allp % cols
        ras = affine[:3, 0] * c.mean() + affine[:3, 1] * r.mean() + affine[:3, 3]
        ras[2] = zs.mean()  # axial series: RAS z = LPS z = imageZposition
        centroid = ras
    else:
        centroid = np.full(3, np.nan)
    return _Annotation(nod, per_z, keys, centroid)


def group_annotations(
    keys: Sequence[np.ndarray], centroids: Sequence[Sequence[float]], readers: Sequence[int], max_distance: float
) -> list[list[int]]:
    """Group annotations of different readers that describe the same nodule.

    Annotations ``i`` and ``j`` of different readers are linked when their voxel key sets share a
    key or their centroids are at most ``max_distance`` mm apart; the groups are the connected
    components (annotation indices, each group sorted).

    Example::

        group_annotations([np.array([1, 2]), np.array([2, 3]), np.array([9])],
                          [[0, 0, 0], [1, 0, 0], [50, 0, 0]], [1, 2, 3], 5.0)   # [[0, 1], [2]]
    """
    n = len(keys)
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    cents = np.asarray(centroids, dtype=np.float64).reshape(n, 3)
    for i in range(n):
        for j in range(i + 1, n):
            if readers[i] == readers[j]:
                continue
            linked = bool(np.linalg.norm(cents[i] - cents[j]) <= max_distance)
            if not linked and keys[i].size and keys[j].size:
                linked = np.intersect1d(keys[i], keys[j], assume_unique=True).size > 0
            if linked:
                parent[find(j)] = find(i)
    groups: dict[int, list[int]] = {}
    for i in range(n):
        groups.setdefault(find(i), []).append(i)
    return [sorted(g) for g in groups.values()]


def consensus(reader_voxels: Sequence[np.ndarray], n_readers: int | None = None) -> np.ndarray:
    """Voxels marked by at least 50% of the readers who marked a nodule: ``2 * count >= n_readers``.

    Args:
        reader_voxels: per reader, the (unique) flat voxel indices of their outline of the nodule.
        n_readers: readers who marked it (default ``len(reader_voxels)``).

    Returns:
        the sorted flat indices of the consensus.

    Example::

        consensus([np.array([1, 2, 3]), np.array([1, 2]), np.array([1]), np.array([4])])   # [1, 2]
    """
    n = len(reader_voxels) if n_readers is None else int(n_readers)
    if not len(reader_voxels):
        return np.empty(0, np.int64)
    values, counts = np.unique(np.concatenate([np.unique(v) for v in reader_voxels]), return_counts=True)
    return values[2 * counts >= max(n, 1)]


# --------------------------------------------------------------------------------------------
# discovery
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One CT series with its reader XML."""

    case_id: str
    patient_id: str
    series_dir: str
    xml: str
    series_uid: str


def _xml_files(folders: Sequence[Path]) -> list[Path]:
    found: list[Path] = []
    for folder in folders:
        found += sorted(p for p in folder.rglob("*") if p.suffix.lower() == ".xml" and p.is_file())
    return found


def _xml_series_uid(path: Path) -> tuple[str, str]:
    """``(kind, series uid)``: kind "ct" (LidcReadMessage), "cxr" (IdriReadMessage) or "other".

    Reads only up to the ResponseHeader's SeriesInstanceUid (the files are large).
    """
    try:
        events = ET.iterparse(path, events=("start", "end"))
        _, root = next(events)
        if root.tag != NS + "LidcReadMessage":
            return ("cxr" if root.tag == NS + "IdriReadMessage" else "other"), ""
        for event, el in events:
            if event == "end" and el.tag == NS + "SeriesInstanceUid" and (el.text or "").strip():
                return "ct", el.text.strip()
            if event == "end" and el.tag == NS + "ResponseHeader":
                break
    except (ET.ParseError, OSError, StopIteration) as e:
        raise DataError(path, f"cannot parse the reader XML ({type(e).__name__}: {e})") from e
    raise DataError(path, "no ResponseHeader/SeriesInstanceUid")


def discover(
    root: str | os.PathLike, xml_dirs: Sequence[str | os.PathLike] = (), report: Report | None = None
) -> list[Case]:
    """Find the CT series and the reader XML files under ``root`` and pair them by SeriesInstanceUID.

    Each folder holding ``*.dcm`` files is one series (its first readable header says which).
    Problems go to ``report``: unreadable XML, XML whose series is not found, two XML files or
    two folders for one series (the first, in path order, is used).

    Example::

        cases = discover("../shared/data/real/lidc_idri_ctc_slabs")
        [c.case_id for c in cases]     # ['LIDC-IDRI-0001', 'LIDC-IDRI-0002', 'LIDC-IDRI-0003']
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(root, "LIDC-IDRI root folder not found")
    report = report or Report("lidc_idri", root)
    series: dict[str, tuple[Path, str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        dcm = sorted(f for f in filenames if f.lower().endswith(".dcm"))
        if not dcm:
            continue
        header = None
        for name in dcm:
            try:
                header = read_header(Path(dirpath) / name)
            except DataError:
                header = None
            if header is not None:
                break
        if header is None:
            report.problem(dirpath, "no readable DICOM file in this folder")
            continue
        if header.modality != "CT":
            report.count("non_ct_series")
            continue
        uid = header.series_instance_uid
        if uid in series:
            report.problem(dirpath, f"duplicate series {uid}: also in {series[uid][0]}; using that one")
            continue
        pid = header.patient_id or Path(dirpath).relative_to(root).parts[0]
        series[uid] = (Path(dirpath), pid)

    xml_for: dict[str, Path] = {}
    for xml in _xml_files([root, *[Path(d) for d in xml_dirs]]):
        try:
            kind, uid = _xml_series_uid(xml)
        except DataError as e:
            report.problem(xml, e.problem)
            continue
        if kind == "cxr":
            report.count("cxr_xml_skipped")
            continue
        if kind == "other":
            report.count("other_xml_skipped")
            continue
        if uid in xml_for:
            report.problem(xml, f"duplicate reader XML for series {uid}: {xml_for[uid]} is used")
            continue
        if uid not in series:
            report.problem(xml, f"reader XML refers to CT series {uid}, which is not under {root}")
            continue
        xml_for[uid] = xml

    cases: list[Case] = []
    used: dict[str, int] = {}
    for uid, (folder, pid) in sorted(series.items(), key=lambda kv: str(kv[1][0])):
        if uid not in xml_for:
            report.count("ct_series_without_xml")
            continue
        used[pid] = used.get(pid, 0) + 1
        case_id = safe_name(pid) if used[pid] == 1 else f"{safe_name(pid)}_s{used[pid]}"
        cases.append(Case(case_id, pid, str(folder), str(xml_for[uid]), uid))
    return cases


# --------------------------------------------------------------------------------------------
# one case
# --------------------------------------------------------------------------------------------


def _case_paths(out: Path, case_id: str, n_readers: int) -> dict[str, Any]:
    return {
        "image": out / "images" / f"{case_id}.nii.gz",
        "consensus": out / "masks" / f"{case_id}_consensus.nii.gz",
        "readers": [out / "masks" / f"{case_id}_reader{r}.nii.gz" for r in range(1, n_readers + 1)],
        "record": out / "cases" / f"{case_id}.json",
    }


def _slice_z(affine: np.ndarray, nz: int) -> np.ndarray:
    """The z (LPS z = RAS z) of each slice of an axial volume."""
    return np.array([(affine @ np.array([0.0, 0.0, k, 1.0]))[2] for k in range(nz)])


def _median(values: Sequence[float]) -> float | None:
    return float(np.median(values)) if len(values) else None


def _class_label(median: float | None, indeterminate: str) -> int | None:
    if median is None:
        return None
    if median > 3:
        return 1
    if median < 3:
        return 0
    return {"exclude": None, "benign": 0, "malignant": 1}[indeterminate]


def convert_case(job: dict[str, Any]) -> dict[str, Any]:
    """Convert one case (a :class:`Case` as a dict plus ``out``, ``settings``); returns its record.

    Skips the case (``record["skipped"] = True``) when its record exists with the same settings
    and every file it lists exists.
    """
    out = Path(job["out"])
    case_id, settings = job["case_id"], job["settings"]
    record_path = out / "cases" / f"{case_id}.json"
    if record_path.is_file():
        try:
            old = json.loads(record_path.read_text())
        except (OSError, json.JSONDecodeError):
            old = None
        if old and old.get("settings") == settings and is_done(*[out / p for p in old.get("files", [])]):
            old["skipped"] = True
            return old

    read = parse_lidc_xml(job["xml"])
    hu, meta = read_dicom_series(job["series_dir"])
    affine = np.asarray(meta["affine"], dtype=np.float64)
    directions = affine[:3, :3] / spacing_of(affine)
    if not (np.allclose(np.abs(directions), np.eye(3), atol=1e-3)):
        raise DataError(job["series_dir"], "not an axial series; LIDC outlines need axial slices")
    nx, ny, nz = hu.shape
    rows, cols = ny, nx
    sop_to_k = sop_slice_index(job["series_dir"], affine, nz)
    slice_z = _slice_z(affine, nz)
    dz = float(spacing_of(affine)[2])

    def k_of(roi: Roi) -> int | None:
        if roi.sop_uid in sop_to_k:
            return sop_to_k[roi.sop_uid]
        j = int(np.argmin(np.abs(slice_z - roi.z)))
        return j if abs(slice_z[j] - roi.z) <= 0.25 * dz else None

    small = [n for n in read.nodules if not n.outlined]
    anns = [_annotation(n, rows, cols, affine) for n in read.nodules if n.outlined]
    anns = [a for a in anns if a.keys.size]  # an outline wholly cut away by exclusions marks nothing
    outlined = [a.nodule for a in anns]
    groups = group_annotations(
        [a.keys for a in anns], [a.centroid for a in anns], [n.reader for n in outlined], settings["group_distance"]
    )
    groups.sort(key=lambda g: tuple(np.mean([anns[i].centroid for i in g], axis=0)[[2, 1, 0]]))

    # every annotation as flat indices into the (x, y, z) volume (C order): sparse, whatever the series size
    def flat(pix: np.ndarray, k: int) -> np.ndarray:
        return ((pix % cols) * ny + pix // cols) * nz + k

    vox: list[np.ndarray] = []
    n_roi_out = 0
    for a in anns:
        parts = []
        for roi_z, pix in a.per_z.items():
            roi = next(r for r in a.nodule.rois if _zkey(r.z) == roi_z and r.inclusion)
            k = k_of(roi)
            if k is not None:
                parts.append(flat(pix, k))
        vox.append(np.unique(np.concatenate(parts)) if parts else np.empty(0, np.int64))
        n_roi_out += sum(1 for r in a.nodule.rois if k_of(r) is None)

    n_sessions = len(read.readers)
    paths = _case_paths(out, case_id, n_sessions)
    voxel_mm3 = float(np.prod(spacing_of(affine)))
    reader_vox: dict[int, list[tuple[int, np.ndarray]]] = {r: [] for r in range(1, n_sessions + 1)}
    cons_vox: list[np.ndarray] = []
    centres: dict[int, np.ndarray] = {}
    nodules = []
    for number, g in enumerate(groups, start=1):
        readers = sorted({outlined[i].reader for i in g})
        per_reader = [np.unique(np.concatenate([vox[i] for i in g if outlined[i].reader == r])) for r in readers]
        for r, v in zip(readers, per_reader):
            reader_vox[r].append((number, v))
        cons = consensus(per_reader)  # >= 50% of the readers who marked this nodule
        cons_vox.append(cons)
        votes = [outlined[i].malignancy for i in g if outlined[i].malignancy is not None]
        chars = {
            name: _median([outlined[i].characteristics[name] for i in g if name in outlined[i].characteristics])
            for name in CHARACTERISTICS
        }
        common = per_reader[0]
        for v in per_reader[1:]:
            common = np.intersect1d(common, v, assume_unique=True)
        rec: dict[str, Any] = {
            "number": number,
            "readers": readers,
            "n_readers": len(readers),
            "annotations": [
                {
                    "reader": outlined[i].reader,
                    "nodule_id": outlined[i].nodule_id,
                    "malignancy": outlined[i].malignancy,
                    "n_rois": len(outlined[i].rois),
                    "voxels_in_series": int(vox[i].size),
                    "z_positions": sorted({float(r.z) for r in outlined[i].rois}),
                }
                for i in g
            ],
            "malignancy_votes": votes,
            "malignancy_median": _median(votes),
            "characteristics_median": chars,
            "centroid_ras_mm": np.round(np.mean([anns[i].centroid for i in g], axis=0), 3).tolist(),
            "consensus_voxels": int(cons.size),
            "consensus_volume_mm3": round(cons.size * voxel_mm3, 3),
            "reader_overlap_voxels": int(common.size),
        }
        if cons.size:
            idx = np.stack(np.unravel_index(cons, hu.shape), axis=1)
            centre = (affine @ np.append(idx.mean(axis=0), 1.0))[:3]
            rec["consensus_centroid_ras_mm"] = np.round(centre, 3).tolist()
            rec["consensus_slices_z"] = sorted({round(float(slice_z[k]), 4) for k in np.unique(idx[:, 2])})
            centres[number] = centre
        nodules.append(rec)

    files: list[Path] = [paths["image"], paths["consensus"], *paths["readers"]]
    write_nifti_atomic(hu, paths["image"], affine, dtype="int16")
    for r in range(1, n_sessions + 1):
        label = np.zeros(hu.shape, dtype=np.uint8)
        for number, v in reader_vox[r]:
            label.reshape(-1)[v] = number
        write_nifti_atomic(label, paths["readers"][r - 1], affine, dtype="uint8")
    cons_map = np.zeros(hu.shape, dtype=np.uint8)
    for number, v in enumerate(cons_vox, start=1):
        cons_map.reshape(-1)[v] = number
    write_nifti_atomic(cons_map, paths["consensus"], affine, dtype="uint8")

    size, crop_spacing = settings["crop_size"], settings["crop_spacing"]
    for number, centre in centres.items():
        rec = nodules[number - 1]
        if crop_spacing > 0:
            caff, cshape = crop_grid(centre, affine, size, crop_spacing)
        else:  # the CT's own grid, integer-aligned: an exact copy of the voxels
            c = np.rint(np.linalg.solve(affine, np.append(centre, 1.0))[:3]).astype(int)
            caff = affine.copy()
            caff[:3, 3] = (affine @ np.append(c - size // 2, 1.0))[:3]
            cshape = (size, size, size)
        img = sample_on_grid(hu, affine, caff, cshape, order=1, cval=-1024.0)
        msk = sample_on_grid(cons_map == number, affine, caff, cshape, order=1, cval=0.0) >= 0.5
        ip = out / "crops" / f"{case_id}_nodule{number}.nii.gz"
        mp = out / "crops" / f"{case_id}_nodule{number}_mask.nii.gz"
        write_nifti_atomic(img, ip, caff, dtype="int16")
        write_nifti_atomic(msk, mp, caff, dtype="uint8")
        files += [ip, mp]
        rec["crop"] = ip.relative_to(out).as_posix()
        rec["crop_mask"] = mp.relative_to(out).as_posix()
        rec["crop_mask_voxels"] = int(msk.sum())

    record = {
        "case_id": case_id,
        "patient_id": job["patient_id"],
        "series_instance_uid": read.series_uid,
        "series_dir": job["series_dir"],
        "xml": job["xml"],
        "settings": settings,
        "shape": [int(s) for s in hu.shape],
        "spacing": np.round(spacing_of(affine), 6).tolist(),
        "slice_z": np.round(slice_z, 4).tolist(),
        "readers": [{"reader": r, "radiologist_id": rid} for r, rid in enumerate(read.readers, start=1)],
        "nodules": nodules,
        "small_nodules": [
            {
                "reader": n.reader,
                "nodule_id": n.nodule_id,
                "z": n.rois[0].z if n.rois else None,
                "xy": n.rois[0].points[0].tolist() if n.rois and len(n.rois[0].points) else None,
            }
            for n in small
        ],
        "non_nodules": read.non_nodules,
        "rois_outside_series": n_roi_out,
        "image": paths["image"].relative_to(out).as_posix(),
        "consensus": paths["consensus"].relative_to(out).as_posix(),
        "reader_labels": [p.relative_to(out).as_posix() for p in paths["readers"]],
        "files": [p.relative_to(out).as_posix() for p in files],
    }
    write_json_atomic(record, record_path)
    record["skipped"] = False
    return record


# --------------------------------------------------------------------------------------------
# the whole dataset
# --------------------------------------------------------------------------------------------


def convert(
    root: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    xml_dirs: Sequence[str | os.PathLike] = (),
    crop_size: int = 64,
    crop_spacing: float = 1.0,
    group_distance: float = 5.0,
    indeterminate: str = "exclude",
    val_fraction: float = 0.2,
    seed: int = 0,
    workers: int = 1,
    progress: bool = True,
    report: Report | None = None,
) -> Report:
    """Convert LIDC-IDRI under ``root`` into ``out_dir`` (see the module doc); returns the report.

    Example::

        report = convert("../shared/data/real/lidc_idri_ctc_slabs", "data/lidc", crop_size=32)
        report.counts["cases"], report.counts["nodules"]       # 3, ...
    """
    if indeterminate not in ("exclude", "benign", "malignant"):
        raise ValueError(f"indeterminate must be exclude, benign or malignant, got {indeterminate!r}")
    if crop_size < 1:
        raise ValueError(f"crop_size must be >= 1, got {crop_size}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = report or Report("lidc_idri", out)
    cases = discover(root, xml_dirs, report)
    settings = {
        "version": SETTINGS_VERSION,
        "crop_size": int(crop_size),
        "crop_spacing": float(crop_spacing),
        "group_distance": float(group_distance),
    }
    jobs = [dict(c.__dict__, out=str(out), settings=settings) for c in cases]
    records = run_items(
        convert_case,
        jobs,
        workers=workers,
        report=report,
        key=lambda j: f"{j['case_id']} ({j['series_dir']})",
        desc="lidc-idri",
        progress=progress,
    )
    records = [r for r in records if r is not None]
    seg, cls = [], []
    for rec in records:
        report.count("cases")
        report.count("skipped_existing" if rec.get("skipped") else "converted")
        report.count("nodules", len(rec["nodules"]))
        report.count("small_nodules", len(rec["small_nodules"]))
        report.count("rois_outside_series", rec["rois_outside_series"])
        seg.append(
            {
                "image": str(out / rec["image"]),
                "label": str(out / rec["consensus"]),
                "reader_labels": [str(out / p) for p in rec["reader_labels"]],
                "case_id": rec["case_id"],
                "patient_id": rec["patient_id"],
                "n_nodules": len(rec["nodules"]),
            }
        )
        for nod in rec["nodules"]:
            if "crop" not in nod:
                report.count("nodules_outside_series")
                continue
            label = _class_label(nod["malignancy_median"], indeterminate)
            if label is None:
                report.count("nodules_without_class")
                continue
            cls.append(
                {
                    "image": str(out / nod["crop"]),
                    "mask": str(out / nod["crop_mask"]),
                    "label": label,
                    "labels": [label],
                    "malignancy": nod["malignancy_median"],
                    "n_readers": nod["n_readers"],
                    "case_id": f"{rec['case_id']}_nodule{nod['number']}",
                    "patient_id": rec["patient_id"],
                }
            )
    report.count("crops", len(cls))
    train, val = split_datalist(seg, val_fraction, seed=seed, group_key="patient_id") if seg else ([], [])
    val_patients = {e["patient_id"] for e in val}
    keys = ("image", "label", "reader_labels", "mask")
    write_datalist_if_changed(
        out / "datalist_seg.json",
        {"training": train, "validation": val, "test": []},
        path_keys=keys,
        name="LIDC-IDRI nodules",
        modality="CT",
        structures=["nodule"],
        description="label = consensus label map (value k = nodule k, >= 50% of its readers); reader_labels = one "
        "label map per reading session (data_prep.lidc_idri)",
    )
    write_datalist_if_changed(
        out / "datalist_nodule_cls.json",
        {
            "training": [e for e in cls if e["patient_id"] not in val_patients],
            "validation": [e for e in cls if e["patient_id"] in val_patients],
            "test": [],
        },
        path_keys=keys,
        name="LIDC-IDRI nodule malignancy",
        modality="CT",
        classes=["malignant"],
        description=f"nodule-centred crops {crop_size}^3 at {crop_spacing or 'native'} mm; label 1 = median "
        f"malignancy > 3, 0 = < 3, median 3: {indeterminate} (data_prep.lidc_idri)",
    )
    return report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``medspan prepare lidc-idri`` / ``python -m data_prep.lidc_idri``."""
    parser.add_argument("--root", required=True, help="LIDC-IDRI folder (TCIA layout or flat slabs)")
    parser.add_argument("--xml-dir", action="append", default=[], help="extra folder with reader XML (repeatable)")
    parser.add_argument("--crop-size", type=int, default=64, help="crop edge in voxels (default 64)")
    parser.add_argument("--crop-spacing", type=float, default=1.0, help="crop voxel size mm (default 1; 0 = CT grid)")
    parser.add_argument(
        "--group-distance",
        type=float,
        default=5.0,
        help="max centroid distance (mm) linking two readers' nodules besides overlap (default 5)",
    )
    parser.add_argument(
        "--indeterminate",
        choices=("exclude", "benign", "malignant"),
        default="exclude",
        help="class of nodules with median malignancy 3 (default exclude)",
    )
    parser.add_argument("--val-fraction", type=float, default=0.2, help="validation fraction, by patient (default 0.2)")
    parser.add_argument("--seed", type=int, default=0, help="split seed (default 0)")
    add_common_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """Convert and write the report; exit code 1 only with ``--strict`` and problems, 2 on fatal errors."""
    return run_converter("lidc_idri", lambda: convert(
        args.root,
        args.out,
        xml_dirs=args.xml_dir,
        crop_size=args.crop_size,
        crop_spacing=args.crop_spacing,
        group_distance=args.group_distance,
        indeterminate=args.indeterminate,
        val_fraction=args.val_fraction,
        seed=args.seed,
        workers=args.workers,
        progress=not args.quiet,
    ), args.strict)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m data_prep.lidc_idri --root R --out D [--crop-size 64] [--workers N] [--strict]``."""
    return converter_main("data_prep.lidc_idri", __doc__, add_arguments, run, argv)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
