"""Leaderboard page, figures and exports (to come)."""
