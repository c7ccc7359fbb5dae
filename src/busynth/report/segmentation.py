"""Report section of ``run.task=segmentation``: test images with their true and predicted lesion outlines."""

from __future__ import annotations

from busynth.classify.checkpoints import read_safetensors_json
from busynth.report.common import Run, cell_dirs, esc, note
from busynth.report.grid import LIME, RED, Tile, grid_to_img


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
        tiles = [Tile(image, [(t, LIME), (p, RED)], name) for image, t, p, name in
                 zip(images, true, pred, meta.get("ids", [""] * len(images)))]
        parts.append(f"<h3>{esc(method)} <small>({esc(found[0].parent.name)})</small></h3>"
                     + grid_to_img([tiles], f"{method} segmentations"))
    if not parts:
        return "<h2>Segmentations</h2>" + note("no cells/*/*/examples.safetensors: no segmentation cell finished")
    return "<h2>Segmentations</h2>" + note(
        "The first test images of each method's first cell: true lesion outline in green, predicted in red. "
        "Dice, IoU and HD95 (MONAI; HD95 in pixels at segmenter.image_size, an empty prediction scored as the "
        "image diagonal) are in the results table.") + "".join(parts)
