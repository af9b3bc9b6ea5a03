"""medgen: diffusion models for paired synthetic brain-MRI data (tumour mask + matching slices)."""

__version__ = "0.1.0"


def generate(**settings):
    """Paired synthetic data from trained checkpoints: see :func:`medgen.generation.generate`."""
    from medgen.generation import generate as _generate

    return _generate(**settings)
