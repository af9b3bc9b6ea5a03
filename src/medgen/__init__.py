"""medgen: diffusion models for paired synthetic brain-MRI data (tumour mask + matching slices)."""

__version__ = "0.1.0"
