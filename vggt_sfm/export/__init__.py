"""Exports of a reconstruction: COLMAP model and database, PLY, gsplat / 3DGS and nerfstudio layouts, dense points."""
