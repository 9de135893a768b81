"""Files copied into saved checkpoints (not imported by rcpu itself).

``modeling_rcpu.py`` is the ``trust_remote_code`` modeling file of checkpoints whose
layers have different widths; see :mod:`rcpu.nonuniform`.
"""
