"""Explaining multi-modal neurons: heatmaps and masks, the paper's property metrics, an HTML report.

    from mmn_fast.explain import write_heatmaps, compute_metrics, write_report

    write_heatmaps(engine, images, engine.find(images), "out/heatmaps")   # per find batch
    metrics = compute_metrics(engine, "out/")                            # docs/metrics.md
    write_report("out/", engine=engine)                                  # out/report.html
"""
from ..find.heatmap import (Heatmap, bilinear, binary_mask, maps, patch_grid, read_heatmaps, render, trace,
                            write_heatmaps)
from .metrics import MetricOptions, compute_metrics, shuffled_image_tokens, summary_table
from .report import build_report, write_report

__all__ = ["Heatmap", "bilinear", "binary_mask", "maps", "patch_grid", "read_heatmaps", "render", "trace",
           "write_heatmaps", "MetricOptions", "compute_metrics", "shuffled_image_tokens", "summary_table",
           "build_report", "write_report"]
