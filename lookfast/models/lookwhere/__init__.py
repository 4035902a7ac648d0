"""LookWhere (Fuller et al., 2025) as a package: model.py (the model, its config and checkpoint loading),
selector.py (the low-resolution selector), fill.py (the segmentation fill), vit.py (the ViT blocks both use)."""
from .model import LookWhere, LookWhereConfig, k_from_mass

__all__ = ["LookWhere", "LookWhereConfig", "k_from_mass"]
