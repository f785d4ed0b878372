"""Score networks: the x_0-predicting transformer and the eps-predicting U-Net.

Both are Flax linen modules called as
model.apply({"params": params}, x_t, t, train=bool, rngs={"dropout": key}),
with parameters from `init_params(model, key, example_input_shape)`.
"""

from biasdiff.models.initializers import count_params, init_params
from biasdiff.models.transformer import Transformer, time_features
from biasdiff.models.unet import UNet, digits_unet
