"""Attack registry and attacks (to come: FGSM, PGD, Carlini-Wagner, universal perturbations)."""
