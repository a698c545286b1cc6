"""A freshly initialized model sees its images: the connector's features are not vanishingly small.

With every connector Linear at std 0.02 the pooled + SwiGLU-projected features of a from-scratch
model started near 1e-6 (the projector multiplies two already-shrunk projections), their gradient
vanished, and a trained policy ignored its cameras (flow loss identical with shuffled images).
"""

from __future__ import annotations

import pytest
import torch

from molmoact2_edge.config import get_preset
from molmoact2_edge.model.molmoact2 import MolmoAct2


@pytest.mark.parametrize("preset", ["tiny", "small-fast"])
def test_fresh_image_features_are_on_the_token_embedding_scale(preset: str) -> None:
    config = get_preset(preset)
    model = MolmoAct2.from_config(config, seed=0)
    h, w = config.vit_config.image_default_input_size
    images = torch.randint(
        0, 256, (2, 1, h, w, 3), generator=torch.Generator().manual_seed(0), dtype=torch.uint8
    )
    with torch.no_grad():
        features = model.encode_images(images)
        other = model.encode_images(images.flip(0))
    tokens = model.model.transformer.wte.embedding.abs().mean()
    assert features.abs().mean() > 0.05 * tokens  # was ~2e-4 x before fan-in scaling
    assert (features - other).abs().mean() > 0.05 * tokens  # and they depend on the image
