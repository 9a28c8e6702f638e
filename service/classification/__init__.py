"""Classification: image inputs, Classify and ClassifyDense over the engine's data plane.

``api`` is what the servicer calls; ``classify`` and ``classify_dense`` are the two calls;
``lookup`` finds logical models and dense twins; ``inputs`` and ``images`` turn images into
network inputs; ``plan`` sizes and checks a dense request; ``chunks`` runs large batches through
the data plane; ``dense`` is the map arithmetic; ``labels`` the top-k ranking.
"""
