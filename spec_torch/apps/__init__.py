"""The application layer: datasets, encoders, the feature cache, the compare and align pipelines, the report
and the ``spec-torch`` command. Needs the ``[apps]`` extra (``pip install "spec_torch[apps]"``).

The library (``import spec_torch``) never imports this package.
"""
