"""Training KV predictors (and auxiliary models): data, losses, ridge initialisation, the loop."""
