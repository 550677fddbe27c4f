"""The HTTP edge: validate requests, check keys and ownership, hand work to the worker pool.

Routes per resource: ``seed`` (the seed API), ``state`` (checkpoints of the seed API),
``tinker/`` (the Tinker SDK's API), ``dashboard`` and ``openapi``; shared services and
request helpers in ``services``.
"""
