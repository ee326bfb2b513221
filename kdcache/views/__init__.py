"""View plans and their replay: which augmented image every model sees.

A plan (`draw_plan`) fixes, for V views of N samples, the order of the samples
and each row's augmentation parameters; `replay` turns images and parameters
into the augmented uint8 batch, `eval_view` gives the test-time view and
`normalize` the float input of a network.
"""

from kdcache.views.recipes import Recipe, draw_plan, draw_view, get_recipe, recipe_names, recipe_spec, view_drawer
from kdcache.views.replay import eval_view, normalize, replay

__all__ = ["Recipe", "draw_plan", "draw_view", "eval_view", "get_recipe", "normalize", "recipe_names", "recipe_spec", "replay",
           "view_drawer"]
