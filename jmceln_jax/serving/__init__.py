"""Using a trained run: the Predictor, the web demo and the exported
(StableHLO) model with its standalone loader."""
