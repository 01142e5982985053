"""Training: recipes (``recipe``), losses (``losses``), batched augmentation (``data``) and the loop
(``loop``) behind ``edgekit train``."""
from edgekit.train.recipe import Recipe, load_recipe, parse_recipe

__all__ = ["Recipe", "load_recipe", "parse_recipe", "train"]


def train(*args, **kwargs):
    """``edgekit.train.loop.train`` (imported lazily: it pulls in the model and data code)."""
    from edgekit.train.loop import train as _train

    return _train(*args, **kwargs)
