"""Classification: image inputs, Classify and ClassifyDense over the engine's data plane."""
