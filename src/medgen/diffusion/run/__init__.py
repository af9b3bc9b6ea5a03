"""What a training run keeps on disk, apart from the maths: the run folder and its lock
(:mod:`.folder`), the checkpoint policy (:mod:`.checkpointer`) and the metrics log
(:mod:`.logger`). Generation never imports this package; it reads checkpoints through
:mod:`medgen.diffusion.utils`."""
