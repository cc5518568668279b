"""MONAI Label's REST dialect on VESSA's ingress (docs/monailabel.md): 3D Slicer's MONAI Label module,
OHIF's panel and the `monailabel` client use a VESSA server unchanged.

  volumes.py     images and label maps in (NIfTI, NRRD: bounded, checked) and out, in the image's geometry
  datastore.py   a dataset under the data root + the labels VESSA wrote for it, as MONAI Label's datastore
  strategies.py  "next sample": VESSA's ranking (trust and diversity), random, first
  training.py    POST /train: the bank rebuilt from the corrected cases, Stage-1 fine-tuned, as a Ray task

The routes are in services/ingress/routes/monailabel.py; nothing here computes a label: every inference
goes to the assistant replicas through `IngressState.call`.
"""
