"""medspan: anatomy-guided attention for self-supervised vision transformers on MONAI."""

__version__ = "0.1.0"
