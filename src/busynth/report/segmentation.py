"""Report section of ``run.task=segmentation``: test images with their true and predicted lesion outlines."""

from __future__ import annotations

from matplotlib.figure import Figure

from busynth.classify.checkpoints import read_safetensors_json
from busynth.report.common import Run, cell_dirs, esc, figure_to_img, note


def section_segmentation(run: Run) -> str:
    """Per method, the first test images of its first cell with the true (green) and predicted (red)
    lesion outlines, from each cell's examples.safetensors."""
    parts = []
    for method in run.methods:
        found = [d / "examples.safetensors" for d in cell_dirs(run, method) if (d / "examples.safetensors").is_file()]
        if not found:
            continue
        tensors, meta = read_safetensors_json(found[0])
        images, true, pred = (tensors[k].numpy() for k in ("images", "true", "pred"))
        fig = Figure(figsize=(1.5 * len(images), 1.7), layout="constrained")
        for ax, image, t, p, name in zip(fig.subplots(1, len(images), squeeze=False)[0], images, true, pred,
                                         meta.get("ids", [""] * len(images))):
            ax.imshow(image, cmap="gray", vmin=0, vmax=255)
            for mask, colour in ((t, "lime"), (p, "red")):
                if mask.any():
                    ax.contour(mask, levels=[0.5], colors=colour, linewidths=0.8)
            ax.set_title(name, fontsize=6)
            ax.axis("off")
        parts.append(f"<h3>{esc(method)} <small>({esc(found[0].parent.name)})</small></h3>"
                     + figure_to_img(fig, f"{method} segmentations"))
    if not parts:
        return "<h2>Segmentations</h2>" + note("no cells/*/*/examples.safetensors: no segmentation cell finished")
    return "<h2>Segmentations</h2>" + note(
        "The first test images of each method's first cell: true lesion outline in green, predicted in red. "
        "Dice, IoU and HD95 (MONAI; HD95 in pixels at segmenter.image_size, an empty prediction scored as the "
        "image diagonal) are in the results table.") + "".join(parts)
