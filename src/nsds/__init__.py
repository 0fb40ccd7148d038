"""nsds: data-free, layer-wise mixed-precision quantization driven by NSDS sensitivity scores."""

__version__ = "0.1.0"
