"""distilkit's benchmarks: loss kernels, large vocabularies, ``fused_linear_kd`` and a whole distillation step.

Run ``python -m benchmarks`` (or ``distilkit bench``) from a source checkout; ``--help`` lists the options. Results go
to ``benchmarks/results/<device>.json`` and ``.md``. Nothing here is asserted in the tests except the result schema:
speed is measured, reported and compared with floors measured in the same run, never checked against a threshold.
"""
