"""Classification: image inputs, Classify and ClassifyDense over the engine's data plane.

``api`` is what the servicer calls; ``classify`` and ``classify_dense`` are the two calls;
``lookup`` finds logical models and dense twins; ``inputs`` and ``images`` turn images into
network inputs; ``plan`` sizes and checks a dense request, ``budget`` its answer's size and its
memory; ``chunks`` runs large batches through the data plane, a chunk at a time; ``dense`` is
the map arithmetic and the map formats; ``labels`` the top-k ranking.
"""
