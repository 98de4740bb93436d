"""latentforge: Stable Diffusion, complete and readable."""

__version__ = "0.1.0"
