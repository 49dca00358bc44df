"""JAX/Flax recommender library: models, layers, losses, metrics, input pipeline, train loop.

No KFP imports here: the pipeline depends on the library, never the reverse.
"""
