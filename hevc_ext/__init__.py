"""hevc-nlf: an online-trained, low-complexity CNN filter for HEVC.

Implements Klopp, Chen & Chien, "Utilising Low Complexity CNNs to Lift Non-Local Redundancies in
Video Coding": the encoder trains a tiny network per group of pictures to predict the coding
residual, signals its quantized parameters in a side stream, and the decoder applies the filter with
integer arithmetic. See README.md and docs/.
"""

__version__ = "0.1.0"
