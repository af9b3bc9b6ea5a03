"""The machinery around a training run, apart from the maths: its folder and lock (:mod:`.folder`),
the checkpoint policy and resume (:mod:`.checkpointer`), and what it records while it trains, the
metrics log and the count of skipped steps (:mod:`.logger`). Generation never imports this
package; it reads checkpoints through :mod:`medgen.diffusion.utils`."""
