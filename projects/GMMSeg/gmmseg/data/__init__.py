"""Datasets and data mapping: Detectron2 glue, loaded through ``gmmseg.d2``. ``gmmseg.data.datasets``
registers the paper's public datasets; generating or converting datasets offline is the separate
``gmmseg_datasets`` package, which this runtime package never imports."""
