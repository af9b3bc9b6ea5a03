"""The demo's settings: the training budget's split and floors, and the two profiles (slices and
volumes) of what differs between ``medgen-demo`` and ``medgen-demo --3d``."""

from __future__ import annotations

from dataclasses import dataclass

from medgen.data.phantom_lesions import MAX_LESIONS

#: share of the training budget that goes to the seg model (the rest trains bravo): it draws the brain
#: with the lesions, and with 35% (330 steps) 58% of its masks had no lesion (gate acceptance 7%)
SEG_SHARE = 0.5
#: fewest steps per model, whatever the budget: a seg model of 150 steps made masks full of specks
#: (the quality gate kept 1% of them), one of 300 steps masks it kept 89% of (phantoms, 64 px, fp32);
#: a CPU that computes bf16 natively fits about 345 seg steps into its share anyway
MIN_STEPS = {"seg": 300, "bravo": 200}
#: measured steps of the timing probe (after 2 warm-up steps)
PROBE_STEPS = 6


@dataclass(frozen=True)
class Profile:
    """What differs between the slice demo and the volume demo (``--3d``)."""

    #: overrides added to every training run
    training: tuple[str, ...]
    #: fewest training steps per model (see :data:`MIN_STEPS`)
    min_steps: dict[str, int]
    #: defaults of --minutes and --pairs
    minutes: float
    pairs: int
    #: the downstream segmenters' batch (slices or whole volumes)
    eval_batch: int
    #: "64 px" or "32 x 32 x 16", and what one sample is
    size: str
    item: str
    #: share of the training budget that goes to the seg model (the rest trains bravo)
    seg_share: float = SEG_SHARE
    #: the phantoms' lesions (:func:`medgen.data.phantom.generate_dataset`'s lesion_sizes, max_lesions)
    lesion_sizes: str = "clinical"
    max_lesions: int = MAX_LESIONS
    #: the downstream segmenters' budget.precision
    eval_precision: str = "fp32"
    #: the two size classes of the insertion stage's new lesions (half each): classes of at least one voxel
    #: (a voxel of the volume demo measures 13.8 mm across, so a tiny lesion, < 10 mm, cannot be drawn there)
    insert_sizes: tuple[str, str] = ("tiny", "small")


SLICES = Profile(training=(), min_steps=MIN_STEPS, minutes=12.0, pairs=64, eval_batch=16, size="64 px", item="slice")
#: 32 x 32 x 16 volumes (voxels of about 7 x 7 x 10 mm) in batches of 2, about 4 volumes/s of training on 2
#: cores (64 x 64 x 32 trains at 0.5 volumes/s, too slow for minutes). The phantoms' lesions are of every size,
#: up to 6 per head (``cover``): the clinical mix (median 7 mm) is mostly under one voxel at this shape, and
#: a seg model of 600 steps on it drew empty masks. On ``cover`` phantoms, 10 minutes split evenly (seg 540
#: steps, gate acceptance 32%) made a demo of 19.3 minutes; 9 minutes with 55% for seg (550 and 460 steps,
#: acceptance 41%) one of 17.5, and of 20.1 in CI and at a slow hour here (a probe of 6 steps said 4.0 minutes
#: for bravo's 728 steps, which took 6.3). Now 8 minutes (seg 553 and bravo 343 steps, acceptance 34%): 13.4, and
#: the downstream segmenters train in bf16 (evaluation 3.9 minutes instead of 6.1)
VOLUMES = Profile(training=("model.image_size=[32,32,16]", "training.batch_size=2"),
                  min_steps={"seg": 400, "bravo": 300}, minutes=8.0, pairs=16, eval_batch=4,
                  size="32 x 32 x 16 voxels", item="volume", seg_share=0.55, lesion_sizes="cover", max_lesions=6,
                  eval_precision="bf16", insert_sizes=("small", "medium"))
