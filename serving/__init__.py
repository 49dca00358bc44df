"""The model server: a serving bundle (:mod:`trainers.export`) answered over HTTP.

One job per module:

* :mod:`serving.protocol`: the request and response format (parsing, validation, limits).
* :mod:`serving.predictor`: a loaded bundle on the device, calls padded to compiled buckets.
* :mod:`serving.device`: the predictor in a child process, restarted with backoff.
* :mod:`serving.batcher`: micro-batching of the rows of all workers, in that process.
* :mod:`serving.shm`: the hand-off of rows and answers in shared memory.
* :mod:`serving.server`: the aiohttp application (health, metadata, predict routes).
* :mod:`serving.workers`: several HTTP worker processes on one port (``--workers``).
* :mod:`serving.registry`: where bundles are kept and found (local registry, GCS, Vertex).
* :mod:`serving.cli`: the ``recml serve`` and ``recml export`` commands.

Only ``jax``, ``numpy`` and the ``serve`` extra are needed (the serving image has nothing
else); ``serving`` imports from ``trainers`` (the bundle format), never from
``components`` or ``pipelines``.
"""
