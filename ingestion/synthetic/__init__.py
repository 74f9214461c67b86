"""Synthetic multi-site brain MRI cohort with known truth (issue 3): ``brainiac synth`` and :func:`generate_cohort`.

Five cohorts are written under ``OUT/``, each a dataset root in a real convention (see :mod:`.layouts`):

========  =======================  ==========================================================================
cohort    folder                   layout and labels
========  =======================  ==========================================================================
bids      synth-lifespan-bids      BIDS raw, T1w/T2w/FLAIR, healthy 5-90 y (``participants.tsv``: age, sex)
brats     synth-brats              BraTS case folders t1/t1ce/t2/flair/seg, IDH and survival CSVs
adni      synth-adni               flat .nii + ``manifest.csv`` (PTID, VISCODE, AGE, PTGENDER, DX CN/MCI, ...)
dicom     synth-gbm-dicom          PACS export, one series per folder, one slice per file, fake PHI, glioma
stroke    synth-stroke-bids        BIDS T1w/FLAIR/DWI, lesion masks in derivatives, ``time_since_stroke_days``
========  =======================  ==========================================================================

The truth lives outside them, in ``OUT/_truth/``:

``scans.csv``
    one row per image and per shipped label map, sorted by (cohort, path). Columns:
    ``cohort``, ``dataset`` (folder), ``path`` (relative to the dataset folder; a series folder for DICOM), ``kind``
    (image | label), ``format`` (nifti | dicom), ``n_files``, ``subject_uid`` (the true person: equal across
    cross-dataset duplicates and sessions), ``cohort_subject_id`` (as written in the dataset), ``session``, ``sequence``
    (T1w, T1ce, T2w, FLAIR, DWI; ``seg`` for label maps), ``age_years`` (true age at the scan, years),
    ``brain_age_years`` (age + brain-age gap, what drives the ageing effects), ``sex`` (F | M), ``diagnosis``
    (CN | MCI | glioma | stroke), ``hippocampal_loss`` (fraction of hippocampal GM lost), ``idh`` (mutant | wildtype),
    ``survival_days`` (true), ``survival_censored_days`` (follow-up when the dataset reports the case alive),
    ``stroke_onset_days``, ``stroke_territory`` (MCA/ACA/PCA-L/R), ``lesion_volume_ml``, ``tumour_volume_ml``,
    ``enhancing_volume_ml``, ``vendor`` (Siemens | GE | Philips), ``manufacturer``, ``scanner_model``,
    ``field_strength_t``, ``voxel_size_mm`` (JSON list), ``shape`` (JSON list), ``axcodes`` (e.g. RAS, LPS, PIR),
    ``dtype`` (int16 | float32 | uint16 for DICOM), ``scl_slope``, ``skull_present``, ``duplicate_of`` (``brats/<path>``
    of the original image, else empty), ``duplicate_group`` (subject uid shared by the copies), ``rigid_transform``
    (JSON, row-major 4x4: template/MNI152 mm -> this scan's scanner mm, RAS), ``rotation_deg`` and ``translation_mm`` (its
    parameters: rotations about x, y, z applied in that order about the head centre (0, -17, 12) mm),
    ``deform_max_mm`` and ``head_scale`` (the non-rigid part of the subject's shape, see below), ``affine`` (JSON 4x4 voxel ->
    scanner mm, RAS), ``mask_path`` (the true brain mask on this scan's grid, under ``_truth/``), ``label_path``
    (the true lesion labels on this scan's grid, under ``_truth/``, when the subject has a lesion), ``tissue_path``
    (the dominant tissue of each voxel: 0 background, 1 CSF, 2 GM, 3 WM, 4 skull, 5 scalp, 6 WMH, 7 tumour/infarct,
    8 extra-cerebral CSF; the brain mask is exactly classes 1, 2, 3, 6, 7;
    zero outside the brain when the scan is skull-stripped), ``head_size_xyz`` (JSON per-axis linear head size at this
    session; ``head_scale`` is its geometric mean, children's included), ``coarse_deform_mm`` (lobe-scale deformation),
    ``brain_shrink_mm`` (retreat of the brain surface from the skull with age and MCI), ``ventricle_growth_mm``,
    ``mass_effect_mm`` (a tumour's push) and ``anatomy_variation`` (the knob they were drawn with).
``masks/<cohort>/<stem>_brainmask.nii.gz``, ``labels/<cohort>/<stem>_labels.nii.gz``, ``tissue/<cohort>/<stem>_dseg.nii.gz``
    uint8 volumes with the scan's affine, all resampled with nearest neighbour only. For DICOM they carry the series' geometry in RAS: compare in millimetres.
``synth.json``
    generator version, seed, preset, subject count and cohort folders (marks a folder as a synth output).

Everything is deterministic in the seed: same seed, same bytes (gzip mtime 0, dates drawn from the seed, no absolute
paths). The generative model and its parameters are in docs/synthetic-cohort.md.
"""

from brainiac.ingestion.synthetic.cohort import ALL_COHORTS, TRUTH_COLUMNS, CohortSummary, generate_cohort
from brainiac.ingestion.synthetic.layouts import DATASET_FOLDERS

__all__ = ["ALL_COHORTS", "DATASET_FOLDERS", "TRUTH_COLUMNS", "CohortSummary", "generate_cohort"]
