"""The data layer: files -> subjects -> tensors. A dataset folder (BIDS or a CSV manifest) is indexed
(``index``), its images prepared on a model grid with their context features (``preprocess``, ``features``),
and split by subject (``splits``); ``cohort`` writes the built-in synthetic cohort as such a folder."""
