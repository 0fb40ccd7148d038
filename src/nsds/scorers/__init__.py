"""Layer-sensitivity scorers. Each takes a WeightSource and returns a ScoreReport."""
