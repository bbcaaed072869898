"""Ray glue: Ray Train stages, the Ray Data labeling pass, Ray Tune sweeps, connecting to Ray.

The only package that imports Ray; everything it runs is plain PyTorch from the core and the methods.
"""
