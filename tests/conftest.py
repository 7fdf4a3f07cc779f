"""Test-wide settings: the models here are tiny, and one thread is fastest for them (and steadiest
on a shared machine)."""

import torch

torch.set_num_threads(1)
