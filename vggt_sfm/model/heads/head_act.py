"""Output activations of VGGT's heads."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def inverse_log(y: torch.Tensor) -> torch.Tensor:
    """sign(y) * (exp(|y|) - 1): the inverse of the log-scaling the point head was trained with."""
    return torch.sign(y) * torch.expm1(torch.abs(y))


def activate_pose(raw: torch.Tensor) -> torch.Tensor:
    """Raw 9-d camera encoding -> absT_quaR_FoV: translation and quaternion linear, field of view ReLU."""
    return torch.cat((raw[..., :7], F.relu(raw[..., 7:])), dim=-1)


def activate_dense(raw: torch.Tensor, activation: str) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, C, H, W] head output -> values [N, H, W, C-1] and confidence 1 + exp(c) [N, H, W].

    `activation` is "exp" (depth) or "inv_log" (point map); the last channel is the confidence.
    """
    raw = raw.permute(0, 2, 3, 1)
    values, conf = raw[..., :-1], raw[..., -1]
    if activation == "exp":
        values = torch.exp(values)
    elif activation == "inv_log":
        values = inverse_log(values)
    else:
        raise ValueError(f"unknown dense activation {activation!r}")
    return values, 1 + torch.exp(conf)
