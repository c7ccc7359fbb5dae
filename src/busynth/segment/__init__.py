"""Segmentation as a second downstream task: MONAI UNet on the engine, MONAI metrics."""
