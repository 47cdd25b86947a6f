"""Offline dataset preparation for GMMSeg-D2: the DigitScapes generator and the label converters of the
paper's public datasets (Cityscapes, ADE20K, COCO-Stuff, Road Anomaly).

Only ``datasets/prepare_*.py``, the tests and the benchmarks use it; the runtime package ``gmmseg`` never
imports it. The ``digitscapes*`` modules need only numpy, Pillow, OpenCV and scikit-learn; the public
datasets' converters reuse ``gmmseg.data.datasets`` (class lists, file checks) and so need Detectron2.
"""
