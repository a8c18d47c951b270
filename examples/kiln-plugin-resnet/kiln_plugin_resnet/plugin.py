"""What Kiln reads on the web and on workers: the plugin's name, its parameters and its input
kind. Importing this module must not import torch (the web never does); the builder's
module is named by a dotted path and imported only on workers."""

from __future__ import annotations

from pydantic import BaseModel, Field

from kiln.plugins import ModelPlugin


class ResNetParams(BaseModel):
    """Residual blocks of two 3x3 convolutions each, then global average pooling and a
    linear head."""

    width: int = Field(default=16, ge=1, le=512, description="Channels of every block.")
    blocks: int = Field(default=2, ge=1, le=16, description="Residual blocks.")
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0, description="Before the head.")


PLUGIN = ModelPlugin(
    name="resnet",
    params=ResNetParams,
    input="image",
    builder="kiln_plugin_resnet.model:build",
    description="A small residual network for image datasets such as builtin:digits_images.",
)
