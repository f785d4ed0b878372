"""biasdiff: measure biased generalization in diffusion models.

Two copies of one score network are trained on disjoint data splits, sampled
from shared noise and compared with each other and with their training sets.
"""

__version__ = "0.1.0"
