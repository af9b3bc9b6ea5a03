"""The demo (``medgen-demo``): the whole pipeline on phantoms, on a laptop CPU, in about 20 minutes.

A layer of its own between the entry points and evaluation: it drives data (phantoms), diffusion
(training), generation and evaluation, and imports nothing from ``medgen.scripts``.

* :mod:`~medgen.demo.profile`: what differs between the slice demo and the volume demo (``--3d``);
* :mod:`~medgen.demo.run`: the five stages, the training budget and the phantoms' record;
* :mod:`~medgen.demo.summary`: ``<out>/summary.md`` and its lesion-contrast check.
"""
