"""One adapter per on-disk layout (bids, brats, manifest, dicom), all behind :class:`~.base.Adapter`."""
