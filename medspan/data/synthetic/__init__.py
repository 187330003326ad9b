"""Synthetic chest anatomy: phantom chest X-rays and chest CTs with organ masks.

With no real data given, medspan builds its default pretraining set from these phantoms: one
case is labeled as the exemplar, registered onto the others to make organ priors, and the
attention maps of the pretrained ViT are scored against the masks. The phantoms aim to look like
radiographs / CTs: smooth organ shapes that vary per case, a global pose change, intensity,
bias-field and noise changes, and non-organ structures (ribs, spine, trachea, vessel markings,
gastric bubble, ...) so that the organs are not simply the only dark blobs.

Every generator is a pure function of its seed: the same seed gives bit-identical arrays.

- :mod:`.shapes`  smooth outlines, noise waves, branching trees (shared by both modalities)
- :mod:`.cxr`     :func:`synth_cxr`, ``(rows, cols)`` PA radiographs
- :mod:`.ct`      :func:`synth_ct`, ``(z, y, x)`` LPS volumes with a RAS ``affine``
- :mod:`.writers` :func:`write_cxr_dataset`, :func:`write_ct_dataset`: PNG / DICOM / NIfTI files and
  a MONAI datalist ``dataset.json``
"""

from medspan.data.synthetic.ct import (
    CT_STRUCTURES,
    ct_geometry,
    nodule_malignancy,
    synth_ct,
)
from medspan.data.synthetic.cxr import CXR_FINDINGS, CXR_STRUCTURES, synth_cxr
from medspan.data.synthetic.shapes import case_seed
from medspan.data.synthetic.writers import write_ct_dataset, write_cxr_dataset

__all__ = [
    "CT_STRUCTURES",
    "CXR_FINDINGS",
    "CXR_STRUCTURES",
    "case_seed",
    "ct_geometry",
    "nodule_malignancy",
    "synth_ct",
    "synth_cxr",
    "write_ct_dataset",
    "write_cxr_dataset",
]
