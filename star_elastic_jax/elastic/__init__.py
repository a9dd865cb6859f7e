"""Elastic nesting: the axes table, choices, masks, budgets, slicing (and ranking, routing)."""
from star_elastic_jax.elastic.axes import AXES
from star_elastic_jax.elastic.budget import choice_for_budget, choice_param_count, default_choice_lists
from star_elastic_jax.elastic.choice import ElasticChoice, ResolvedChoice
from star_elastic_jax.elastic.importance import rank
from star_elastic_jax.elastic.masks import build_masks, masks_from_choice
from star_elastic_jax.elastic.slicing import slice_model, slice_params

__all__ = ["AXES", "ElasticChoice", "ResolvedChoice", "build_masks", "choice_for_budget", "choice_param_count",
           "default_choice_lists", "masks_from_choice", "rank", "slice_model", "slice_params"]
