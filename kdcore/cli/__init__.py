"""The ``kd`` command line."""
