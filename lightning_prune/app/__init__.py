"""The Hydra application: config schemas (:mod:`~lightning_prune.app.config`) and their validation
(:mod:`~lightning_prune.app.validation`), the main job :func:`lightning_prune.app.train.train`, sweep summaries
(:mod:`~lightning_prune.app.sweep`) and the sensitivity job (:mod:`~lightning_prune.app.sensitivity`).

It builds on the library below it and nothing below imports it. Importing :mod:`lightning_prune.app.train`
registers the config schemas that the files in ``conf/`` extend.
"""
