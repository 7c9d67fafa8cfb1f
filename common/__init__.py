"""Pieces that two or more problems share: schedules, seeding, devices, images, checkpoints, datasets, DDIM."""
