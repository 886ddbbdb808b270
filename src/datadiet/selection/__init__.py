"""Pruning on score columns (`strategies`: hardest, easiest, window, random, stratified CCS, their registry) and
learned subset selection (`hostcp`: HOST-CP, imported on use)."""

from .strategies import hardness, list_strategies, prune, register_strategy, select_indices, stratified_split

__all__ = ["hardness", "list_strategies", "prune", "register_strategy", "select_indices", "stratified_split"]
