"""Converters that turn public datasets into medspan/MONAI datalists (one module per dataset)."""
