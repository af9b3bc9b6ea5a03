"""Convert public brain-metastasis releases into medgen's dataset layout (see docs/architecture.md, Data).

Two source formats, one module each:

* **BrainMetShare PNG** (:mod:`.brainmetshare_png`; Stanford BrainMetShare-3): a folder of 8-bit PNG
  slices per channel and patient, with the fixed orientation its docstring states.
* **nnU-Net raw** (:mod:`.nnunet`): ``imagesTr/``, ``labelsTr/``, optionally ``imagesTs/`` +
  ``labelsTs/`` and ``dataset.json``.

Output: ``DST/<split>/<patient>/<modality>.nii.gz`` written with
:func:`medgen.data.nifti_dataset.save_volume`; only the mapped modalities plus ``seg`` are written.
Both write all-or-nothing under a lock on the destination (:mod:`.common`).
"""

from medgen.data.importers.brainmetshare_png import (
    DEFAULT_PNG_MAPPING,
    PNG_SEG_FOLDER,
    import_brainmetshare_png,
    png_slice_to_ras,
)
from medgen.data.importers.common import ImportFormatError
from medgen.data.importers.nnunet import import_nnunet

__all__ = [
    "DEFAULT_PNG_MAPPING",
    "PNG_SEG_FOLDER",
    "ImportFormatError",
    "import_brainmetshare_png",
    "import_nnunet",
    "png_slice_to_ras",
]
