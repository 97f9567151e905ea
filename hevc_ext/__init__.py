"""hevc-nlf: an online-trained, low-complexity CNN filter for HEVC.

Implements Klopp, Chen & Chien, "Utilising Low Complexity CNNs to Lift Non-Local Redundancies in
Video Coding": the encoder trains a tiny network per group of pictures to predict the coding
residual, signals its quantized parameters in a side stream, and the decoder applies the filter with
integer arithmetic. See README.md and docs/.
"""

__version__ = "0.1.0"

_LAZY = {"Encoder": "api", "Decoder": "api", "Packet": "api"}  # imported on first use: `import hevc_ext` stays light


def __getattr__(name: str) -> object:  # PEP 562: lazy attributes
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
