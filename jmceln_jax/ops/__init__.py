"""Numerics under the models: resizing, CPU convolution forms, scan/stacking
helpers and the XLA compiler options."""
