"""An example Kiln model plugin: a small ResNet for image datasets (docs/models.md)."""
