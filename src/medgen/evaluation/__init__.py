"""Is a synthetic set any good? Metrics, feature distances, downstream segmentation, a report.

    medgen-evaluate real_dir=data/brainmetshare-3 synthetic_dir=synthetic out_dir=evaluation
"""


class EvaluationError(ValueError):
    """The sets cannot be compared as asked; the message says why (and names the key or folder)."""
