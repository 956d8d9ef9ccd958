"""BRIEF (Calonder, Lepetit, Strecha, Fua, "BRIEF: Binary Robust Independent Elementary Features",
ECCV 2010): smoothing, sampling patterns, binary tests, a keypoint detector, Hamming matching and a
bag of binary words. Pure PyTorch/NumPy; every function works on a batch of images on any device.
"""
