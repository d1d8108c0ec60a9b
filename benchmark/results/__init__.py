"""What a run measures and keeps: per-sample and per-cell metrics, the SQLite store, and the reliability checks
that compare a store's cells with each other."""
