"""Datasets and data mapping. ``gmmseg.data.digitscapes`` (the generator) imports no Detectron2; the rest is
Detectron2 glue and is loaded through ``gmmseg.d2``."""
